"""Prefetch lists parse strictly and are checked against the image after whiteouts."""

import pytest

from converter.prefetch import PrefetchList, PrefetchListError
from formats.toc import TocEntry


def _layers():
    lower = [
        TocEntry("usr", "dir"),
        TocEntry("usr/bin/python3", "reg", 10),
        TocEntry("usr/lib/py/a.py", "reg", 1),
        TocEntry("etc/old.conf", "reg", 1),
        TocEntry("opt/app/x", "reg", 1),
    ]
    upper = [
        TocEntry("etc/.wh.old.conf", "reg"),
        TocEntry("opt/app/.wh..wh..opq", "reg"),
        TocEntry("opt/app/y", "reg", 1),
    ]
    return [lower, upper]


def test_parse_and_missing():
    plist = PrefetchList.parse_lines(
        [
            "# startup",
            "/usr/bin/python3",
            "/usr/lib/",
            "",
            "/etc/old.conf",
            "/opt/app/x",
            "/opt/app/y",
            "/usr/bin/python3/",
        ]
    )
    assert plist.as_paths()[:2] == ["/usr/bin/python3", "/usr/lib/"]
    assert plist.missing(_layers()) == ["/etc/old.conf", "/opt/app/x", "/usr/bin/python3/"]


@pytest.mark.parametrize("line", ["relative/path", "/../etc/passwd", "/a/\0b"])
def test_bad_lines(line):
    with pytest.raises(PrefetchListError):
        PrefetchList.parse_lines([line])


def test_whiteouts_and_opaque_directories_hide_lower_paths():
    plist = PrefetchList.parse_lines(["/etc/old.conf", "/opt/app/x", "/opt/app/y", "/usr/lib/"])
    assert plist.missing(_layers()) == ["/etc/old.conf", "/opt/app/x"]
