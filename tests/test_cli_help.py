"""The first minutes with `asg-probe`: help is instant and explains itself, every default works.

Help and argument errors must not import torch (seconds on an idle machine, more under load):
checked in a fresh interpreter, where nothing else has imported it. Every subcommand that takes
a checkpoint defaults to a bundled model that its analysis applies to; the cheap ones are run.
"""
import json
import subprocess
import sys
import textwrap

import pytest

from asg_probe import cli_help
from asg_probe.cli import _small_in_scientific, _step, main
from asg_probe.cli_args import build_parser, is_reference_name


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_help_and_argument_errors_do_not_import_torch():
    code = textwrap.dedent("""
        import contextlib, io, sys
        from asg_probe.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            for argv in (["--help"], ["layerwise", "--help"], ["report", "--help"]):
                try:
                    main(argv)
                except SystemExit as exc:
                    assert exc.code == 0, (argv, exc.code)
            codes = [main(["layerwise", "--num-images", "0"]), main(["shuffle-test", "--no-such-flag"])]
        assert codes == [2, 2], codes
        assert "examples:" in out.getvalue()
        print("torch" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False", "help or an argument error imported torch"


@pytest.mark.parametrize("name", sorted(cli_help.COMMAND_HELP))
def test_every_subcommand_has_a_description_examples_and_a_column_key(name, capsys):
    assert set(cli_help.COMMAND_HELP) == set(_subcommands())
    with pytest.raises(SystemExit):
        main([name, "--help"])
    text = capsys.readouterr().out
    assert cli_help.description(name).split()[0] in text
    examples = [line for line in text.splitlines() if line.strip().startswith(f"asg-probe {name}")]
    assert 1 <= len(examples) <= 3 if name == "list" else 2 <= len(examples) <= 3
    # every example parses (the placeholder paths aside, which only validation looks at)
    for line in examples:
        build_parser().parse_args(line.split("#")[0].split()[1:])
    if name != "list":
        assert "printed columns:" in text


def test_every_default_checkpoint_is_a_bundled_model_its_analysis_applies_to():
    from asg_probe.analysis.pos_similarity import position_embeddings
    from asg_probe.reference import load_reference_model

    defaults = {name: p.get_default("checkpoint") for name, p in _subcommands().items()}
    for name, default in defaults.items():
        if default is not None:
            assert is_reference_name(default), (name, default)
    # pos-similarity needs a position table; the general default (guidance) has none
    emb, grid = position_embeddings(load_reference_model(defaults["pos-similarity"]))
    assert emb.shape[:2] == grid
    with pytest.raises(ValueError, match="pos-similarity ape"):
        position_embeddings(load_reference_model("guidance"))


def test_pos_similarity_and_check_equivariance_defaults_succeed(tmp_path, capsys):
    assert main(["pos-similarity", "--out", str(tmp_path / "pos")]) == 0
    assert "--seed" not in build_parser().parse_args(["pos-similarity"]).__dict__
    assert main(["check-equivariance", "--num-images", "2", "--out", str(tmp_path / "eq")]) == 0
    out = capsys.readouterr().out
    assert "CERTIFIED equivariant" in out
    doc = json.loads((tmp_path / "eq" / "equivariance.json").read_text())
    # errors near 1e-16 are printed, not rounded to 0.000
    tol_text = _small_in_scientific(doc["layers"][1]["tol"])
    assert "e-1" in tol_text and tol_text in out


def test_a_model_without_a_position_table_is_a_one_line_usage_error(tmp_path, capsys):
    assert main(["pos-similarity", "guidance", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "ape" in err[0]


def test_small_numbers_and_steps_are_printed_as_what_they_are():
    assert _small_in_scientific(4.7e-1) == "0.470"
    assert _small_in_scientific(7.1e-15) == "7.1e-15"
    assert _small_in_scientific(0.0) == "0"
    assert [_step(v) for v in (256.0, 200.5, None, float("nan"))] == ["256", "200.5", "never", "never"]
