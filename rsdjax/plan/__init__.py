"""Planning: cost model, mesh planner, ahead-of-time compile check, HLO collectives (`rsdjax plan`)."""
