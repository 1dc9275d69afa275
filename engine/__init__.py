"""Run plumbing every stage shares: the command line, the step loop, checkpoints and resume, run records,
metrics, data parallelism, deployment files. It knows no network and no method."""
