"""Metrics files and TensorBoard scalars: each record lands at its own optimizer step."""
from compodistill.train.metrics import MetricsLogger, read_metrics


class FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        pass


def test_tensorboard_scalars_use_the_record_step(tmp_path):
    writer = FakeWriter()
    logger = MetricsLogger(tmp_path, tensorboard=writer)
    for step in (5, 10, 15):
        logger.log({"stage": "dft", "step": step, "loss": 1.0 / step, "loss_vat": 0.1})
    steps = sorted({s for tag, _, s in writer.scalars if tag == "dft/loss"})
    assert steps == [5, 10, 15]
    assert not any(tag == "dft/step" for tag, _, _ in writer.scalars)


def test_truncate_keeps_earlier_records_and_does_not_relog_tensorboard(tmp_path):
    writer = FakeWriter()
    logger = MetricsLogger(tmp_path, tensorboard=writer)
    for step in (1, 2, 3):
        logger.log({"stage": "dpt", "step": step, "loss": float(step)})
    before = len(writer.scalars)
    logger.truncate(2)
    assert [r["step"] for r in read_metrics(logger.jsonl_path)] == [1, 2]
    csv_rows = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert csv_rows[0].split(",") == ["stage", "step", "loss"] and len(csv_rows) == 3
    assert len(writer.scalars) == before
