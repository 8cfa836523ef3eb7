"""MovieLens ingest: the real ML-100k files, a tiny ml-latest fixture, and error handling."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ML100K
from training.data import raw
from training.data.movielens import ingest


def _check_schemas(tables: raw.RawTables) -> None:
    for name, df in tables.frames().items():
        table = raw.to_arrow(name, df)
        assert table.schema == raw.SCHEMAS[name], name
        assert all(table.column(c).null_count == 0 for c in table.column_names), name


def test_ml100k() -> None:
    if not ML100K.is_dir():
        pytest.skip(f"{ML100K} is absent")
    tables = ingest(ML100K)
    _check_schemas(tables)
    assert len(tables.users) == 943 and len(tables.pins) == 1682 and len(tables.interests) == 19
    ev = tables.events
    assert len(ev) == 200_000
    assert ev["event_type"].value_counts().to_dict().keys() == {"impression", "save", "click"}
    assert (ev["event_type"] == "impression").sum() == 100_000
    assert (ev["surface"] == raw.HOMEFEED).all()
    assert set(tables.users["gender"]) == {"f", "m"}
    assert tables.users["segment"].nunique() == 21
    assert tables.interests["name"].iloc[0] == "unknown" and tables.interests["name"].iloc[-1] == "Western"
    # Movies listed twice under two ids share one signature: 18 such titles.
    groups = tables.pins.groupby("image_signature")["pin_id"].size()
    assert (groups == 2).sum() == 18 and groups.max() == 2
    chasing_amy = tables.pins[tables.pins["pin_id"].isin([246, 268])]
    assert chasing_amy["image_signature"].nunique() == 1
    created = ev["pin_id"].map(tables.pins.set_index("pin_id")["created_at"])
    assert (ev["event_timestamp"] >= created).all()
    first = ev.groupby("user_id")["event_timestamp"].min()
    assert (tables.users.set_index("user_id")["signup_at"].reindex(first.index) < first).all()


RATINGS = """userId,movieId,rating,timestamp
1,10,4.0,964982703
1,20,3.5,964981247
2,10,5.0,964982224
2,30,2.0,964983815
3,20,4.5,964982931
"""
MOVIES = """movieId,title,genres
10,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy
20,"American President, The (1995)",Comedy|Drama|Romance
30,Babylon 5,(no genres listed)
40,"american  president, the (1995)",Drama
50,Never Rated (1990),Sci-Fi
"""


def _latest(root: Path, ratings: str = RATINGS, movies: str = MOVIES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratings.csv").write_text(ratings)
    (root / "movies.csv").write_text(movies)
    return root


def test_ml_latest_fixture(tmp_path: Path) -> None:
    tables = ingest(_latest(tmp_path))
    _check_schemas(tables)
    names = tables.interests.set_index("interest_id")["name"].to_dict()
    assert names[0] == "unknown" and list(names.values())[1:] == sorted(
        ["Adventure", "Animation", "Children", "Comedy", "Fantasy", "Drama", "Romance", "Sci-Fi"]
    )
    pins = tables.pins.set_index("pin_id")
    assert [names[i] for i in pins["interest_id"]] == ["Adventure", "Comedy", "unknown", "Drama", "Sci-Fi"]
    assert pins.loc[20, "image_signature"] == pins.loc[40, "image_signature"] != pins.loc[10, "image_signature"]
    # created_at = one second before the first rating; unrated -> one second before the data set's first
    first = tables.events.groupby("pin_id")["event_timestamp"].min()
    for pin in (10, 20, 30):
        assert pins.loc[pin, "created_at"] == first[pin] - pd.Timedelta(seconds=1)
    for pin in (40, 50):
        assert pins.loc[pin, "created_at"] == tables.events["event_timestamp"].min() - pd.Timedelta(seconds=1)

    users = tables.users.set_index("user_id")
    assert list(users.index) == [1, 2, 3]
    assert (users["age"] == 0).all() and (users["gender"] == "u").all() and (users["segment"] == "unknown").all()
    assert users.loc[1, "signup_at"] == pd.Timestamp(964981247 - 1, unit="s", tz="UTC")

    ev = tables.events
    assert len(ev) == 10 and (ev["event_type"] == "impression").sum() == 5
    assert (ev["surface"] == "homefeed").all()
    engaged = ev[ev["event_type"] != "impression"].set_index(["user_id", "pin_id"])["event_type"].to_dict()
    assert engaged == {(1, 10): "save", (1, 20): "click", (2, 10): "save", (2, 30): "click", (3, 20): "save"}
    save = ev[(ev["user_id"] == 1) & (ev["pin_id"] == 10)]
    assert list(save["event_timestamp"].diff().dropna()) == [pd.Timedelta(seconds=1)]
    assert ev["event_timestamp"].is_monotonic_increasing


def test_malformed_lines_are_dropped_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = "".join(f"{u},{m},4.0,{964982703 + u}\n" for u in range(1, 200) for m in (10, 20))
    # Two malformed lines (bad movie id, too few fields) and one rating of an unknown movie.
    ratings = "userId,movieId,rating,timestamp\n" + good + "7,abc,4.0,964982703\n8,10\n9,99,4.0,964982703\n"
    with caplog.at_level(logging.WARNING, logger="training.data.movielens"):
        tables = ingest(_latest(tmp_path, ratings=ratings))
    assert (tables.events["event_type"] == "impression").sum() == 398
    messages = [r.getMessage() for r in caplog.records if "ratings.csv" in r.getMessage()]
    assert any("dropped 2 of 401 rows (malformed)" in m for m in messages), messages
    assert any("dropped 1 of 401 rows (ratings of unknown users or movies)" in m for m in messages), messages

    lines = good.splitlines(keepends=True)[:90] + [f"{u},x,4,1\n" for u in range(10)]
    bad = "userId,movieId,rating,timestamp\n" + "".join(lines)
    with pytest.raises(ValueError, match=r"ratings\.csv.*malformed"):
        ingest(_latest(tmp_path / "bad", ratings=bad))


def test_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        ingest(tmp_path / "does-not-exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*u\.data.*ratings\.csv"):
        ingest(empty)

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "u.data").write_text("1\t10\t4\t881250949\n")
    with pytest.raises(FileNotFoundError, match=r"u\.item, u\.user"):
        ingest(partial)

    (partial / "u.data").write_text("")
    (partial / "u.item").write_text("10|Toy Story (1995)|01-Jan-1995||http://x" + "|0" * 18 + "|1\n")
    (partial / "u.user").write_text("1|24|M|technician|85711\n")
    with pytest.raises(ValueError, match=r"u\.data is empty"):
        ingest(partial)

    with pytest.raises(ValueError, match="header"):
        ingest(_latest(tmp_path / "header", ratings="user,movie,rating,ts\n1,10,4,1\n"))


# ML-1M layout: '::'-separated, latin-1 titles, titles with single colons, a users file with coded age/occupation.
RATINGS_DAT = ("1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n2::30::2::978300275\n"
               "3::20::4::978824291\n")
MOVIES_DAT = ("10::Toy Story (1995)::Animation|Children's|Comedy\n"
              "20::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Fantasy|Sci-Fi\n"
              "30::Misérables, Les (1995)::Drama|Musical\n"
              "40::Star wars: episode IV - a new hope (1977)::Sci-Fi\n")
USERS_DAT = "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::99::55117\n"


def _dat(root: Path, ratings: str = RATINGS_DAT, movies: str = MOVIES_DAT, users: str | None = USERS_DAT) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratings.dat").write_bytes(ratings.encode("latin-1"))
    (root / "movies.dat").write_bytes(movies.encode("latin-1"))
    if users is not None:
        (root / "users.dat").write_bytes(users.encode("latin-1"))
    return root


def test_ml1m_dat_fixture(tmp_path: Path) -> None:
    tables = ingest(_dat(tmp_path))
    _check_schemas(tables)
    names = tables.interests.set_index("interest_id")["name"].to_dict()
    assert names[0] == "unknown" and list(names.values())[1:] == sorted(
        ["Animation", "Children's", "Comedy", "Action", "Adventure", "Fantasy", "Sci-Fi", "Drama", "Musical"])
    pins = tables.pins.set_index("pin_id")
    assert [names[i] for i in pins["interest_id"]] == ["Animation", "Action", "Drama", "Sci-Fi"]
    # a title with a single colon stays whole; the same title twice shares one signature
    assert pins.loc[20, "image_signature"] == pins.loc[40, "image_signature"] != pins.loc[30, "image_signature"]
    users = tables.users.set_index("user_id")
    assert list(users["gender"]) == ["f", "m", "m"] and list(users["age"]) == [1, 56, 25]
    assert list(users["segment"]) == ["K-12 student", "self-employed", "unknown"]
    engaged = tables.events[tables.events["event_type"] != "impression"]
    assert engaged.set_index(["user_id", "pin_id"])["event_type"].to_dict() == {
        (1, 10): "save", (1, 20): "click", (2, 10): "save", (2, 30): "click", (3, 20): "save"}


def test_ml10m_dat_without_users_and_half_stars(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = "".join(f"{u}::{m}::{4.5 if m == 10 else 3.5}::{1111111111 + u}\n" for u in range(1, 200) for m in (10, 20))
    ratings = good + "7::abc::4::1\n8::10\n"
    with caplog.at_level(logging.WARNING, logger="training.data.movielens"):
        tables = ingest(_dat(tmp_path, ratings=ratings, users=None))
    _check_schemas(tables)
    assert len(tables.users) == 199 and (tables.users["segment"] == "unknown").all()
    counts = tables.events["event_type"].value_counts().to_dict()
    assert counts == {"impression": 398, "save": 199, "click": 199}
    assert any("ratings.dat: dropped 2 of 400 rows (malformed)" in r.getMessage() for r in caplog.records)


def test_dat_errors_name_the_file(tmp_path: Path) -> None:
    root = tmp_path / "partial"
    root.mkdir()
    (root / "ratings.dat").write_text("1::10::5::978300760\n")
    with pytest.raises(FileNotFoundError, match=r"movies\.dat"):
        ingest(root)
    bad = "".join(f"{u}::x::4::1\n" for u in range(10)) + "1::10::5::978300760\n"
    with pytest.raises(ValueError, match=r"ratings\.dat.*malformed"):
        ingest(_dat(tmp_path / "bad", ratings=bad))
