"""The dashboard: an operator's pages, rendered on the server, served by the task API's router
under `/dashboard` (so under the app's prefix and behind its dependencies)."""
