"""The HTTP API: the routes (`tasks`, `schedules`, `health`, the standalone `demo`), the
router that binds them to one Backstop (`router`), dependencies (`deps`), bodies
(`schemas`), the standalone token middleware (`middleware`) and error answers (`handlers`)."""
