"""Evaluate a trained AWPCN run: extract features, rank the gallery, print Rank-k/mAP/mINP.

    python test.py [--name RUN] [--data_dir DIR] [--weighting adaptive|uniform]
                   [--ap official|standard] [--rerank] [--report] [--batchsize N] [--amp]

Everything about the model comes from model/RUN/opts.yaml. Writes to the run folder:
result.txt (appended), features.pt (what demo.py and report.py read), cmc.png, and with
--report report.html. The work is done in results.py (and inference.py's extraction loop),
which other code imports: this file cannot be imported as ``test``.
"""
from __future__ import annotations

import sys

# run_test and sets_line are also reached as attributes of this script by the tests that
# load it by path (tests/test_pipeline.py, tests/test_converters.py).
from results import build_parser, run_test, sets_line  # noqa: F401
from utils import cli


@cli
def main(argv=None) -> int:
    run_test(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
