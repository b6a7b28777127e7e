"""The HTML skeleton every reading-room page shares: head, header and
navigation, the error page. twisted.web.template escapes every value."""
from __future__ import annotations

from twisted.web.template import Tag, flattenString, tags

from medd.viewer.web.session import CSRF_FIELD, Session
from medd.webresource import Response

ERROR_TITLES = {400: "Bad request", 401: "Not logged in", 403: "Refused", 404: "Not found", 413: "Too large",
                415: "Wrong form", 423: "Locked", 422: "Cannot show this image", 500: "Viewer error", 502: "Backend error"}


def data(**values) -> dict[str, str]:
    """``data-*`` attributes for a tag (``study_uid`` -> ``data-study-uid``)."""
    return {"data-" + k.replace("_", "-"): v for k, v in values.items()}


async def html(status: int, tag: Tag) -> Response:
    body = await flattenString(None, tag)
    return Response(status, "text/html; charset=utf-8", b"<!DOCTYPE html>\n" + body)


def page(title: str, session: Session | None, *content, body_class: str = "", body_data: dict | None = None) -> Tag:
    nav = []
    if session is not None:
        nav = tags.nav(
            tags.a("Worklist", href="/worklist"),
            tags.span(session.user, class_="user"),
            tags.form(
                tags.input(type="hidden", name=CSRF_FIELD, value=session.csrf),
                tags.button("Log out", type="submit", class_="link"),
                method="post", action="/logout", class_="logout",
            ),
        )
    head = tags.head(
        tags.meta(charset="utf-8"),
        tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
        tags.title(f"{title} · medd reading room"),
        tags.link(rel="icon", href="data:,"),  # no favicon request, no 404 in the log
        tags.link(rel="stylesheet", href="/static/reading-room.css"),
    )
    body_data = dict(body_data or {})
    if session is not None:
        # The idle lock (/static/idle-lock.js) and the page's API calls read these.
        body_data.update(data(csrf=session.csrf, idle_lock=f"{session.idle_lock:g}", user=session.user))
        head(tags.script(src="/static/idle-lock.js", defer="defer"))
    return tags.html(
        head,
        tags.body(
            tags.header(tags.a("medd reading room", href="/worklist" if session else "/", class_="brand"), nav),
            Tag("main")(*content),
            class_=body_class,
            **body_data,
        ),
        lang="en",
    )


async def error_page(status: int, message: str, session: Session | None) -> Response:
    title = ERROR_TITLES.get(status, "Error")
    content = [tags.h1(title), tags.p(message, class_="error")]
    content.append(tags.p(tags.a("Back to the worklist", href="/worklist") if session else tags.a("Log in", href="/")))
    return await html(status, page(title, session, *content))
