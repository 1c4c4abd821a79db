"""Assertions shared by the tests."""


def one_line_error(result) -> str:
    """Assert the command failed with exactly one line on stderr and no traceback."""
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vmstate: "), stderr
    return lines[0]


NETNS_SENDER, NETNS_RECEIVER = "10.231.0.1", "10.231.0.2"   # the `namespaces` fixture's hosts
