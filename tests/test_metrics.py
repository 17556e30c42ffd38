"""metrics.jsonl: what MetricsLogger writes is what read_metrics (the one reader the session,
the benches and the tests use) gives back, whole or by kind."""

from types import SimpleNamespace

import pytest

from clm.metrics import MetricsLogger, read_metrics


class _Accelerator(SimpleNamespace):
    def log(self, values, step):
        self.logged.append((step, values))


def test_what_the_logger_writes_reads_back_whole_and_by_kind(tmp_path):
    assert read_metrics(tmp_path) == [], "no file yet: nothing logged"
    accelerator = _Accelerator(is_main_process=True, logged=[])
    logger = MetricsLogger(tmp_path, accelerator, max_steps=3)
    logger.log_train({"step": 1, "tokens": 64, "loss": 4.0, "tokens_per_sec": 10.0})
    logger.log_train({"step": 2, "tokens": 128, "loss": None, "skipped": 1})  # a skipped step
    logger.log_eval(2, 128, {"eval_loss": 3.5})
    logger.close()

    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 2]
    assert [r["step"] for r in read_metrics(tmp_path, "train")] == [1, 2]
    (evaluation,) = read_metrics(tmp_path, "eval")
    assert evaluation["eval_loss"] == 3.5 and evaluation["eval_ppl"] == pytest.approx(33.11545)
    assert (tmp_path / "loss_curve.png").is_file()
    with pytest.raises(ValueError, match="kind must be"):
        read_metrics(tmp_path, "evals")


def test_other_ranks_write_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, _Accelerator(is_main_process=False, logged=[]), max_steps=1)
    logger.log_train({"step": 1, "tokens": 64, "loss": 4.0})
    assert read_metrics(tmp_path) == [] and not (tmp_path / "metrics.jsonl").exists()

