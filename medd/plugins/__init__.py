"""Plugin hooks, interfaces and the host that loads plugins."""
