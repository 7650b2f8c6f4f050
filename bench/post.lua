-- The same POST for every endpoint, so requests are alike; /bench/* ignore the body.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"name": "bench.noop"}'
