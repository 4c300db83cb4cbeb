"""Running the ``placer`` CLI in-process from tests: exit code, stdout, stderr."""

from __future__ import annotations

from placer.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_exit2(capsys, *args, needle: str) -> str:
    """Assert bad input exits 2 with one stderr line naming ``needle``; returns that line."""
    code, out, err = run(capsys, *args)
    assert code == 2, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]
