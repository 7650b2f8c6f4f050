"""Backstop's store: the schema, the engine and every SQL statement the service runs.

It knows nothing of FastAPI, APScheduler or the task registry; `app` calls the named
functions here and never builds a statement itself.
"""
