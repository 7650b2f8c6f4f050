"""Defining tasks: `@task`, the registry, the context a task sees, the retry and recurrence
policies, and the built-in tasks."""
