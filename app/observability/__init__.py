"""What an operator sees of a Backstop: Prometheus metrics (`metrics`) and OpenTelemetry
traces (`tracing`). The structured logs are `app.logs`."""
