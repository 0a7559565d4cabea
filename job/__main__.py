"""`python -m job`, and the `migrate-job` console script (`job.__main__:launch`).

Start-up tricks, each kept because `make bench` shows it pays (a run at head takes about 110 ms;
sixteen replicas starting at once on two cores decide the 16-replica row), and all of them here
but the one that must live with the logger:

- the cyclic GC runs far less often (below): a run is short and mostly imports, and the GC would
  re-scan the freshly imported modules over and over (5.7 ms a start);
- the process ends without the interpreter's teardown (`launch`): by then every connection is
  closed and every line written, and tearing down the modules costs 21 ms a start, a quarter of a
  second when sixteen replicas exit together;
- `run` holds its first log lines until it has tried the lock (job.logs.HELD);
- values are NamedTuples, not dataclasses: `dataclasses` imports `inspect`, 6.5 ms a start.
"""

import gc

gc.set_threshold(50_000, 50, 100)


def launch() -> None:
    """Run the command, flush, and exit without the interpreter's teardown."""
    import os
    import sys

    from job.cli import main

    from job import db, logs

    code = main()
    import logging  # loaded by then: every run ends with a line through structlog, which sets it up

    logging.shutdown()
    # the lines still queued get a moment: shorter once a signal asked the job to end (a reader
    # that stopped reading must not keep it past its grace period; the lock is released by now)
    logs.drain(db.AFTER_SIGNAL if db.received_signal() else 10.0)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # gone, closed, or never there: not the job's failure
            pass
    os._exit(code)


if __name__ == "__main__":
    launch()
