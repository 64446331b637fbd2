"""The remote door: bluesky-queueserver's 0MQ protocol served by this kernel — the method
table, the REP transport, the PUB info socket and CurveZMQ client identities."""
