"""The benchmarks' shared flags (benchmarks._common.parser)."""

from __future__ import annotations

import pathlib

import pytest

from benchmarks import _common


def test_parser_holds_the_named_shared_flags_with_their_meaning():
  p = _common.parser("A benchmark.\n\nMore text.", ("quick", "out", "no-readme", "render"),
                     help={"quick": "one small layer"})
  assert p.description == "A benchmark."
  args = p.parse_args([])
  assert (args.quick, args.out, args.no_readme, args.render) == (False, None, False, False)
  args = p.parse_args(["--quick", "--out", "x/y", "--no-readme", "--render"])
  assert args.quick and args.out == pathlib.Path("x/y") and args.no_readme and args.render
  assert "one small layer" in p.format_help() and "do not update benchmarks/README.md" in p.format_help()


def test_parser_leaves_out_the_flags_not_named_and_takes_its_own():
  p = _common.parser("A benchmark.", ("no-readme",), prog="python -m benchmarks.x")
  p.add_argument("--repeats", type=int, default=3)
  assert p.prog == "python -m benchmarks.x"
  assert p.parse_args(["--repeats", "5", "--no-readme"]).repeats == 5
  with pytest.raises(SystemExit):
    p.parse_args(["--quick"])


def test_parser_refuses_names_that_are_not_shared_flags():
  with pytest.raises(ValueError, match=r"\['--quick'\] are not shared benchmark flags"):
    _common.parser("A benchmark.", ("--quick",))
  with pytest.raises(ValueError, match=r"\['fast'\]"):
    _common.parser("A benchmark.", help={"fast": "x"})


def test_readme_section_goes_before_the_goals_once(tmp_path, monkeypatch):
  readme = tmp_path / "README.md"
  readme.write_text("# Benchmarks\n\n## Other\n\ntext\n\n## Where the goals stand\n\ngoals\n")
  monkeypatch.setattr(_common, "README", readme)
  heading = "## A benchmark (`a_bench`)"
  _common.ensure_section("a_bench", heading, "What it measures. " * 20)
  _common.ensure_section("a_bench", heading, "What it measures.")  # once only
  _common.update_readme("a_bench", "table")
  text = readme.read_text()
  assert text.count(heading) == 1 and text.count("<!-- BEGIN a_bench -->") == 1
  assert text.index("## Other") < text.index(heading) < text.index("table") < text.index("## Where the goals")
  assert max(len(line) for line in text.splitlines()) <= 116  # the paragraph is wrapped
