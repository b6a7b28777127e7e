"""E-mail as a transport between real mail servers: packages sent through the site's smarthost
(:mod:`medd.mail.submit`) and taken from an IMAP mailbox (:mod:`medd.mail.mailbox`)."""
