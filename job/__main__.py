"""`python -m job`, and the `migrate-job` console script (`job.__main__:launch`)."""

import gc

# A run is short and mostly imports, and the cyclic GC would re-scan the freshly imported modules
# over and over: about 7 % of a run at head. Collect far less often instead (still bounded).
gc.set_threshold(50_000, 50, 100)


def launch() -> None:
    from job.cli import entrypoint

    entrypoint()


if __name__ == "__main__":
    launch()
