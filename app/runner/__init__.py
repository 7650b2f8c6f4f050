"""The runner: claims due tasks, runs them and records what came of them.

Its threads, each with one job (see `docs/threads.md`): the event loop runs async tasks
and the pipeline; `pool` runs sync task functions; `dbthread` sends every statement the
runner writes, in order; `checkpointer` keeps the SQLite WAL short; `wakeup` watches for
other processes' enqueues.
"""
