"""The vendored xxHash header is the release its VERSION file names, and the
native sources built on its internals assert that same version."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

SOURCES = Path(__file__).resolve().parents[2] / "kvstore" / "_native" / "src"
VENDORED = SOURCES / "third_party" / "xxhash"


def version_file() -> dict[str, str]:
    fields = {}
    for line in (VENDORED / "VERSION").read_text().splitlines():
        match = re.fullmatch(r"(tag|sha256 xxhash\.h): (\S+)", line.strip())
        if match:
            fields[match[1]] = match[2]
    return fields


def header_version() -> tuple[int, int, int]:
    header = (VENDORED / "xxhash.h").read_text()
    parts = [
        int(re.search(rf"^#define XXH_VERSION_{name}\s+(\d+)\s*$", header, re.M)[1])
        for name in ("MAJOR", "MINOR", "RELEASE")
    ]
    return parts[0], parts[1], parts[2]


def test_header_sha256_matches_version_file():
    digest = hashlib.sha256((VENDORED / "xxhash.h").read_bytes()).hexdigest()
    assert version_file()["sha256 xxhash.h"] == digest


def test_tag_matches_header_version_macros():
    major, minor, release = header_version()
    assert version_file()["tag"] == f"v{major}.{minor}.{release}"


def test_sources_using_xxhash_assert_the_vendored_version():
    major, minor, release = header_version()
    number = major * 100 * 100 + minor * 100 + release
    users = [
        path
        for path in sorted(SOURCES.glob("*.[ch]*"))
        if re.search(r'#include\s+"third_party/xxhash/xxhash\.h"', path.read_text())
    ]
    assert users, "no native source includes the vendored xxhash.h"
    for path in users:
        asserted = re.findall(r"static_assert\(\s*XXH_VERSION_NUMBER\s*==\s*(\d+)", path.read_text())
        assert asserted == [str(number)], path.name
