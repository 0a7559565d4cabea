"""MIGRATE_BACKUP_DIR=s3://… (job.config.parse_s3) and the upload's part sizes (job.bucket.part_size)."""

from __future__ import annotations

import pytest

from job.bucket import MAX_PARTS, PART, part_size
from job.config import S3Location, _backup_location, parse_s3
from job.errors import ConfigError


@pytest.mark.parametrize("url, expected", [
    ("s3://backups", S3Location("backups", "")),
    ("s3://backups/", S3Location("backups", "")),
    ("s3://backups/team/app", S3Location("backups", "team/app/")),
    ("s3://backups/team/app/", S3Location("backups", "team/app/")),
    ("s3://my.backups-1/x", S3Location("my.backups-1", "x/")),
])
def test_a_bucket_and_prefix_are_read(url: str, expected: S3Location) -> None:
    """The prefix always ends in one slash, or is empty."""
    assert expected == parse_s3(url)


@pytest.mark.parametrize("url, says", [
    ("s3://AKIA:secret@backups/app", "no credentials"),
    ("s3://backups:9000/app", "no credentials or port"),
    ("s3://Backups/app", "not a bucket name"),
    ("s3://b/app", "not a bucket name"),
    ("s3://backups/a//b", "plain path segments"),
    ("s3://backups/a/../b", "plain path segments"),
    ("s3://backups/a?versionId=1", "plain path segments"),
])
def test_a_bad_location_is_refused_with_what_to_write(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_s3(url)
    assert says in str(refused.value)
    assert "secret" not in str(refused.value).replace("secret access key", "").replace("AWS_SECRET", "")


def test_backup_dir_keeps_directories_and_normalises_s3() -> None:
    """A directory is kept as given; an S3 location is written one way; another scheme is refused."""
    assert ("/backups", "s3://backups/app/") == (_backup_location("/backups"), _backup_location("S3://backups/app"))
    with pytest.raises(ConfigError, match="s3://bucket/prefix"):
        _backup_location("gs://backups/app")


def test_parts_grow_once_so_that_memory_stays_at_two_parts() -> None:
    """8 MiB parts, 16 MiB past half the part limit: at most 32 MiB in memory, 117 GiB in one upload."""
    sizes = [part_size(n) for n in range(1, MAX_PARTS + 1)]

    assert (PART, 2 * PART) == (sizes[0], sizes[-1]) and PART == 8 << 20
    assert 117 == sum(sizes) >> 30
