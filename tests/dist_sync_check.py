"""Run under `torchrun --nproc_per_node 2`: train_clm.py's real main with host reads counted per
optimizer step (helpers.HostReads); each rank writes its counts to OUT/host_reads_<rank>.json.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_sync_check.py <train_clm.py arguments>
"""

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from helpers import HostReads, run  # noqa: E402


def main(argv):
    reads = HostReads()
    reads.install(setattr)
    run(argv)
    import os

    out = Path(argv[argv.index("--output_dir") + 1])
    (out / f"host_reads_{os.environ['RANK']}.json").write_text(json.dumps(reads.per_step))


if __name__ == "__main__":
    main(sys.argv[1:])
