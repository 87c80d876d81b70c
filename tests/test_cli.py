"""The command line: user errors are one line on stderr with exit status 2 (tracebacks only
with --debug), and the help lists every subcommand and flag."""
import subprocess
import sys

import pytest

from compodistill.cli import build_parser, main

from _helpers import assert_one_line_error


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "compodistill.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def in_process(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err


def test_missing_config_file(capsys, tmp_path):
    assert_one_line_error(*in_process(capsys, "train", "--config", str(tmp_path / "nope.yaml")),
                          "compodistill train: error:", "config file not found:", "nope.yaml")


def test_missing_checkpoint_is_named_before_anything_is_written(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"student: {tmp_path}/checkpoints/student\noutput_dir: {tmp_path}/out\n")
    result = run_cli("train", "--config", str(cfg))  # the real entry point, in a subprocess
    assert_one_line_error(result.returncode, result.stderr, "student: checkpoint folder not found",
                          "checkpoints/student", "compodistill demo")
    assert not (tmp_path / "out").exists()


def test_bad_config_value_names_key_value_and_choices(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("kd: {loss: kld}\n")
    assert_one_line_error(*in_process(capsys, "train", "--config", str(cfg)),
                          "kd.loss", "'kld'", "'reverse_kl'")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["train", "--config", str(tmp_path / "nope.yaml"), "--debug"])


def test_eval_missing_model_folder(capsys, tmp_path):
    assert_one_line_error(*in_process(capsys, "eval", "vqa", "--model", str(tmp_path / "m"),
                                      "--data", str(tmp_path / "d.json")),
                          "--model: model folder not found")


def test_demo_rejects_a_bad_option(capsys, tmp_path):
    assert_one_line_error(*in_process(capsys, "demo", "--out", str(tmp_path), "--dft-steps", "0"),
                          "--dft-steps must be >= 1")


def test_help_lists_subcommands_and_describes_every_flag():
    parser = build_parser()
    text = parser.format_help()
    for command in ("demo", "train", "eval", "data", "demo-losses"):
        assert command in text
    assert "capabilities land" not in text and "``" not in text
    subparsers = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"][0]
    eval_help = subparsers.choices["eval"].format_help()
    assert "cr" in eval_help and "vqa" in eval_help and "rest" not in eval_help

    def check(p, where):
        for action in p._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, child in action.choices.items():
                    check(child, f"{where} {name}")
            elif action.option_strings and action.dest != "help":
                assert action.help, f"{where} {action.option_strings[0]} has no description"
    check(parser, "compodistill")


def test_quiet_silences_transformers_bars(tmp_path):
    transformers = pytest.importorskip("transformers")
    main(["data", "synth", "--out", str(tmp_path / "d"), "--num", "4", "--quiet"])
    assert not transformers.utils.logging.is_progress_bar_enabled()
