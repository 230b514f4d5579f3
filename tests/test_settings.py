"""settings.py: typed settings, --help, and every settings class refusing values out of range with the range."""
import subprocess
import sys
from pathlib import Path

import pytest

from settings import Progress, cli
from train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def test_settings_are_typed_and_unknown_ones_refused(capsys):
    (cfg,) = cli("doc", TrainConfig, argv=["--tune_lr", "0.01", "--force"])
    assert cfg.tune_lr == 0.01 and cfg.force is True
    with pytest.raises(SystemExit):
        cli("doc", TrainConfig, argv=["--tune_rate", "0.01"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --tune_rate" in err and "--tune_lr" in err  # the usage lists the valid ones
    with pytest.raises(SystemExit):
        cli("doc", TrainConfig, argv=["--base_steps", "many"])
    assert "invalid int value" in capsys.readouterr().err


def test_help_lists_every_setting_with_its_comment(capsys):
    from data.prepare import DataConfig
    with pytest.raises(SystemExit) as e:
        cli("doc", TrainConfig, DataConfig, argv=["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--general_tokens" in out and "95% train" in out and "--tune_lr" in out


@pytest.mark.parametrize("argv, message", [
    (["--steps", "-3"], "--steps -3: must be >= 0"), (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--batch_size", "0"], "--batch_size 0: must be >= 1"), (["--sure_gamma", "120"], "must be in [0, 100]"),
    (["--alpha", "-1"], "--alpha -1.0: must be >= 0"), (["--sga_gamma", "2"], "--sga_gamma 2.0: must be in [0, 1]")])
def test_out_of_range_settings_are_refused_with_the_range(argv, message, capsys):
    import unlearn_ga
    with pytest.raises(SystemExit) as e:
        cli("doc", unlearn_ga.UnlearnConfig, unlearn_ga.RetainConfig, unlearn_ga.SGAConfig, argv=argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_every_settings_class_checks_its_ranges(capsys):
    from data.prepare import DataConfig
    from quantize import QuantConfig
    from evaluate import StudyConfig
    from unlearn_memflex import MemFlexConfig
    from unlearn_npo import NPOConfig
    from task_arithmetic import TAConfig
    for cls, argv, message in [(TrainConfig, ["--mem_frac", "1.0"], "one general window"),
                               (TrainConfig, ["--n_embd", "30"], "multiple of --n_head"),
                               (DataConfig, ["--book_prefix", "48"], "below --seq_len"),
                               (DataConfig, ["--secret_reps", "1,x"], "comma list"),
                               (QuantConfig, ["--nsamples", "0"], "--nsamples 0: must be >= 1"),
                               (QuantConfig, ["--method", "hqq"], "rtn, gptq, nf4, fp4, awq"),
                               (QuantConfig, ["--absmax", "--no-sym"], "symmetric integer grid"),
                               (StudyConfig, ["--workers", "-1"], "--workers -1: must be >= 0"),
                               (MemFlexConfig, ["--randomize", "1.5"], "in [0, 1]"),
                               (NPOConfig, ["--beta", "0"], "--beta 0.0: must be > 0"),
                               (TAConfig, ["--phi", "-0.1"], "in [0, 1]")]:
        with pytest.raises(SystemExit):
            cli("doc", cls, argv=argv)
        assert message in capsys.readouterr().err, (cls.__name__, argv)


@pytest.mark.parametrize("cmd, message", [(["quantize.py", "--method", "gptq", "--nsamples", "0"], "must be >= 1"),
                                          (["unlearn_ga.py", "--steps", "-3"], "--steps -3: must be >= 0")])
def test_bad_command_lines_end_in_a_message_not_a_traceback(tmp_path, cmd, message):
    r = subprocess.run([sys.executable, *cmd, "--out_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_progress_guesses_from_the_real_models_units_until_one_is_done(capsys):
    """Before any row is done the time left is the guess per row (GUESS's real model: 19 s, so 15 rows are 285 s);
    after one, the measured mean."""
    p = Progress(1, Progress.GUESS["hf"], method=1, row=15)
    p.done("method", "ga_gdr", 250.0)
    assert capsys.readouterr().out.endswith("| ~285s left\n")
    p.done("row", "target", 100.0, n=5)
    assert capsys.readouterr().out.endswith("| ~200s left\n")
