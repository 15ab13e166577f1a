"""The peer programs of ``benchmarks.peers``: the job's work written as a user would write it in Daft
and in Ray Data, each run as a process of its own on the peers' environment (.peers-env)."""
