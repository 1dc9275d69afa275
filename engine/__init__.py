"""Run plumbing every stage shares: the command line, the step loop, checkpoints and resume, run records,
metrics, data parallelism, deployment files, and the networks rebuilt from checkpoints. It knows no
method."""
