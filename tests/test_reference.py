"""The docs' configuration page is generated from the config model (`tapeline.reference`) and kept current."""

from __future__ import annotations

from pathlib import Path

import pytest

from tapeline.config import config_keys
from tapeline.reference import configuration_page, main

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_the_committed_configuration_page_is_current() -> None:
    assert PAGE.read_text() == configuration_page(), "run `python -m tapeline.reference docs/configuration.md`"


def test_the_page_has_every_key_with_its_default_and_mark() -> None:
    page = configuration_page()
    for key, _default, _text in config_keys():
        assert f"| `{key}` |" in page, key
    assert "| `data.batch_size` | `256` | global batch size | used by train |" in page
    assert "| `train.steps_per_execution` | `32` |" in page and "PydanticUndefined" not in page
    assert "| `model.params` | `{}` |" in page


def test_check_mode_says_when_the_page_is_stale(tmp_path: Path) -> None:
    target = tmp_path / "configuration.md"
    assert main(["--check", str(target)]) == 1
    assert main([str(target)]) == 0 and main(["--check", str(target)]) == 0
    target.write_text(target.read_text() + "edited\n")
    assert main(["--check", str(target)]) == 1


def test_help_prints_usage_and_writes_no_file_named_after_an_option(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "usage: python -m tapeline.reference" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["--chek", "page.md"])
    assert exit_.value.code == 2 and "unrecognized arguments: --chek" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
