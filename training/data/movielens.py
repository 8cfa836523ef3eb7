"""MovieLens ingest: ML-100k original files, ML-1M / ML-10M ``.dat`` files or ml-latest(-small) csv as
``RawTables``.

Layouts (detected from the files present):

- ML-100k: ``u.data`` (tab: user, item, rating, unix seconds), ``u.item`` ('|', latin-1: id, title,
  release date like ``01-Jan-1995``, video release, url, 19 genre flags), ``u.user`` ('|': id, age,
  gender, occupation, zip).
- ML-1M / ML-10M: ``ratings.dat`` (user::movie::rating::unix seconds), ``movies.dat`` (id::title::genres joined
  by '|'; latin-1 when not UTF-8) and, ML-1M only, ``users.dat`` (id::gender::age code::occupation code::zip;
  the occupation codes are named as in the ML-1M README). Fields are separated by ``::``, so a title keeps its
  single colons.
- ml-latest / ml-latest-small: ``ratings.csv`` (userId, movieId, rating, timestamp) and
  ``movies.csv`` (movieId, title, genres joined by '|', or ``(no genres listed)``); no user file.

Mapping:

- Every rating is an ``impression`` at its timestamp plus an engagement one second later:
  ``save`` if rating >= 4, else ``click``. Every event is on the ``homefeed`` surface: a rating says
  nothing about where the movie was found, and this keeps all of it as training labels.
- Interests are the genres: ``unknown`` is id 0, then the other genres in alphabetical order
  (ML-100k: its 19 genres in file order, which is exactly that). A movie's ``interest_id`` is its
  first genre (first flagged column / first listed name); a movie without any is ``unknown``.
- ``created_at`` = one second before the movie's first rating: when it entered the catalogue, as a
  pin's creation is its upload (release dates reach back to the 1920s, long before the platform
  existed). An unrated movie gets the data set's first rating time.
- ``image_signature`` = first 16 hex chars of sha1(title lowercased, whitespace collapsed), so a
  movie listed twice under two ids shares one signature. ML-100k has 18 such duplicate-title
  groups (18 titles listed twice: 1682 movies, 1664 distinct normalised titles).
- Users: ML-100k age, gender lowercased ('m'/'f', anything else 'u'), segment = occupation;
  ML-1M: age is its age-group code (1, 18, 25, ...), segment its occupation's name;
  ML-10M and ml-latest users (those with ratings) get age 0, gender 'u', segment 'unknown'. ``signup_at`` is
  one second before the user's first rating (the data set's first rating for users without any).

Malformed rows (wrong field count, unparsable ids/ratings/timestamps/genre flags) and ratings of
unknown users or movies are dropped and counted; a WARNING names the file and the count, and more
than ``max_bad_fraction`` of a file (``contracts.max_bad_fraction``), or an empty file, raises ValueError
naming the file. Missing
files raise FileNotFoundError naming the path and the expected files.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from training.data.raw import HOMEFEED, RawTables

log = logging.getLogger(__name__)

ML100K_FILES = ("u.data", "u.item", "u.user")
LATEST_FILES = ("ratings.csv", "movies.csv")
DAT_FILES = ("ratings.dat", "movies.dat")
DAT_USERS = "users.dat"
DAT_SEP = "::"
UNIT_SEP = "\x1f"
"""What ``DAT_SEP`` becomes before Arrow splits a ``.dat`` file: the ASCII unit separator, in no MovieLens field."""
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer", "programmer",
    "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
    "unemployed", "writer",
)  # fmt: skip
UNKNOWN_GENRE = "unknown"
ML100K_GENRES = (
    UNKNOWN_GENRE, "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
LATEST_NO_GENRE = "(no genres listed)"
SAVE_MIN_RATING = 4.0
US_PER_SECOND = 1_000_000

_EXPECTED = (f"expected ML-100k files ({', '.join(ML100K_FILES)}), ML-1M / ML-10M files ({', '.join(DAT_FILES)}) "
             f"or ml-latest csv files ({', '.join(LATEST_FILES)})")


def ingest(path: str | Path, max_bad_fraction: float = 0.01) -> RawTables:
    """Read a MovieLens directory (either layout) into the raw tables; a file with more than
    ``max_bad_fraction`` malformed or dangling rows is an error."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"MovieLens path {root} does not exist; {_EXPECTED}")
    if not root.is_dir():
        raise ValueError(f"MovieLens path {root} is not a directory; {_EXPECTED}")
    if (root / "u.data").exists():
        layout, tables = "ML-100k", _ingest_100k(root, max_bad_fraction)
    elif (root / "ratings.dat").exists():
        layout, tables = "ML-1M/10M", _ingest_dat(root, max_bad_fraction)
    elif (root / "ratings.csv").exists():
        layout, tables = "ml-latest", _ingest_latest(root, max_bad_fraction)
    else:
        raise FileNotFoundError(f"MovieLens path {root} holds neither layout; {_EXPECTED}")
    log.info(
        "ingested %s from %s: %s users, %s movies, %s genres, %s events",
        layout,
        root,
        f"{len(tables.users):,}",
        f"{len(tables.pins):,}",
        len(tables.interests),
        f"{len(tables.events):,}",
    )
    return tables


def _require(root: Path, names: tuple[str, ...], layout: str) -> None:
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"MovieLens {layout} directory {root} lacks {', '.join(missing)} (needs {', '.join(names)})"
        )


def _check_dropped(path: Path, dropped: int, total: int, what: str, max_bad: float) -> None:
    """Log dropped rows; raise when they exceed ``max_bad`` of the file."""
    if dropped == 0:
        return
    if dropped > max_bad * total:
        raise ValueError(f"{path}: {dropped:,} of {total:,} rows are {what} (more than {max_bad:.0%}; "
                         "contracts.max_bad_fraction)")
    log.warning("%s: dropped %s of %s rows (%s)", path, f"{dropped:,}", f"{total:,}", what)


def _load(
    path: Path,
    columns: list[str],
    sep: str,
    ints: list[str],
    floats: tuple[str, ...] = (),
    encoding: str = "utf8",
    header: str | None = None,
    max_bad: float = 0.01,
) -> tuple[pd.DataFrame, int]:
    """Read a delimited file as strings and parse ``ints`` (whole numbers) and ``floats``.

    ``sep`` ``'::'`` (the ``.dat`` files) splits each line on that pair, so single colons stay inside a
    field; ``encoding`` is then a fallback after UTF-8. Lines with the wrong number of fields or an
    unparsable number are dropped (see ``_check_dropped``). With ``header`` the first line must equal it.
    Returns the kept rows, shape (kept, len(columns)), and the number of data lines read (kept + dropped).
    """
    if sep == DAT_SEP:
        df, invalid = _read_dat(path, columns, encoding)
    else:
        df, invalid = _read_delimited(path, columns, sep, encoding, header)
    total = len(df) + invalid
    if total == 0:
        raise ValueError(f"{path} is empty")
    parsed = {c: pd.to_numeric(df[c].str.strip(), errors="coerce") for c in [*ints, *floats]}
    ok = np.logical_and.reduce([v.notna().to_numpy() for v in parsed.values()])
    for c in ints:
        ok &= (parsed[c] % 1 == 0).to_numpy()
    _check_dropped(path, total - int(ok.sum()), total, "malformed", max_bad)
    return df.assign(**parsed)[ok].reset_index(drop=True), total


def _read_delimited(path: Path, columns: list[str], sep: str, encoding: str,
                    header: str | None, source: pa.BufferReader | None = None) -> tuple[pd.DataFrame, int]:
    """(string frame of the well-formed lines, number of lines with the wrong field count); ``source`` replaces
    the file's bytes (``path`` then only names it in errors)."""
    if header is not None:
        with open(path, encoding=encoding) as f:
            first = f.readline().strip()
        if first != header:
            raise ValueError(f"{path}: header is {first!r}, expected {header!r}")
    invalid = 0

    def skip(_row: pacsv.InvalidRow) -> str:
        nonlocal invalid
        invalid += 1
        return "skip"

    try:
        table = pacsv.read_csv(
            path if source is None else source,
            read_options=pacsv.ReadOptions(column_names=columns, skip_rows=int(header is not None), encoding=encoding),
            parse_options=pacsv.ParseOptions(
                delimiter=sep, quote_char='"' if sep == "," else False, invalid_row_handler=skip
            ),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}),
        )
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            raise ValueError(f"{path} is empty") from e
        raise ValueError(f"{path}: cannot be parsed: {e}") from e
    return table.to_pandas(), invalid


def _read_dat(path: Path, columns: list[str], fallback_encoding: str) -> tuple[pd.DataFrame, int]:
    """(string frame of the well-formed ``::`` lines, number of lines with the wrong field count); UTF-8,
    else ``fallback_encoding`` (ML-1M's titles are latin-1). Each ``::`` becomes ``UNIT_SEP``, a byte no MovieLens
    field holds (nor any UTF-8 or latin-1 character's encoding), so Arrow's reader splits the lines
    (a 10M-line ratings.dat, ML-10M's size: 16 s to read, 37 s parsed, 4.2 GB peak; splitting the lines in Python
    took 94 s and 5.6 GB)."""
    raw = path.read_bytes()
    try:
        raw.decode("utf8")
        encoding = "utf8"
    except UnicodeDecodeError:
        encoding = fallback_encoding
    return _read_delimited(path, columns, UNIT_SEP, encoding, None,
                           source=pa.BufferReader(raw.replace(DAT_SEP.encode(), UNIT_SEP.encode())))


def _utc_seconds(seconds: np.ndarray) -> pd.DatetimeIndex:
    """Unix seconds (shape (n,)) as datetime64[us, UTC]."""
    return pd.DatetimeIndex((seconds.astype(np.int64) * US_PER_SECOND).view("datetime64[us]")).tz_localize("UTC")


def _signature(titles: pd.Series) -> np.ndarray:
    """(n,) object array: 16 hex chars of sha1 of each normalised title."""
    return np.array(
        [hashlib.sha1(" ".join(t.lower().split()).encode()).hexdigest()[:16] for t in titles.tolist()], dtype=object
    )


def _events(path: Path, ratings: pd.DataFrame, total: int, users: np.ndarray, movies: np.ndarray,
            max_bad: float) -> pd.DataFrame:
    """Impressions and engagements from ratings (user, item, rating, ts) of known users and movies.

    ``total`` is the number of lines of the ratings file, for the dropped-rows check.
    """
    known = ratings["user"].isin(users).to_numpy() & ratings["item"].isin(movies).to_numpy()
    _check_dropped(path, int((~known).sum()), total, "ratings of unknown users or movies", max_bad)
    r = ratings[known]
    user = r["user"].to_numpy(np.int64)
    item = r["item"].to_numpy(np.int64)
    ts = r["ts"].to_numpy(np.int64) * US_PER_SECOND
    code = np.where(r["rating"].to_numpy() >= SAVE_MIN_RATING, 2, 1).astype(np.int8)
    labels = np.array(["impression", "click", "save"], dtype=object)
    all_user, all_item = np.concatenate([user, user]), np.concatenate([item, item])
    all_code = np.concatenate([np.zeros(len(r), dtype=np.int8), code])
    all_ts = np.concatenate([ts, ts + US_PER_SECOND])
    order = np.lexsort((all_code, all_item, all_user, all_ts))
    return pd.DataFrame(
        {
            "user_id": all_user[order],
            "pin_id": all_item[order],
            "event_type": labels[all_code[order]],
            "event_timestamp": pd.DatetimeIndex(all_ts[order].view("datetime64[us]")).tz_localize("UTC"),
            "surface": np.full(len(order), HOMEFEED, dtype=object),
        }
    )


def _first_rating(ratings: pd.DataFrame, key: str, ids: np.ndarray) -> np.ndarray:
    """(len(ids),) first rating time (unix seconds, float) per id; NaN for ids without ratings."""
    return ratings.groupby(key)["ts"].min().reindex(ids).to_numpy(np.float64)


def _pins(ids: np.ndarray, interest: np.ndarray, titles: pd.Series, ratings: pd.DataFrame) -> pd.DataFrame:
    """The pins table for movies ``ids`` (n,), created one second before their first rating."""
    created = _first_rating(ratings, "item", ids) - 1
    created[np.isnan(created)] = ratings["ts"].min() - 1
    return pd.DataFrame(
        {
            "pin_id": ids,
            "interest_id": interest.astype(np.int64),
            "image_signature": _signature(titles),
            "created_at": _utc_seconds(created),
        }
    )


def _signup(ratings: pd.DataFrame, ids: np.ndarray) -> pd.DatetimeIndex:
    """(len(ids),) one second before each user's first rating (the data set's first when none)."""
    first = _first_rating(ratings, "user", ids)
    first[np.isnan(first)] = ratings["ts"].min()
    return _utc_seconds(first - 1)


def _ingest_100k(root: Path, max_bad: float) -> RawTables:
    _require(root, ML100K_FILES, "ML-100k")
    rating_cols = ["user", "item", "rating", "ts"]
    data_path = root / "u.data"
    ratings, n_ratings = _load(data_path, rating_cols, "\t", ["user", "item", "ts"], ("rating",), max_bad=max_bad)

    flags = [f"g{i}" for i in range(len(ML100K_GENRES))]
    item_path = root / "u.item"
    item_cols = ["id", "title", "release", "video", "url", *flags]
    items, _ = _load(item_path, item_cols, "|", ["id", *flags], encoding="latin-1", max_bad=max_bad)
    flag_values = items[flags].to_numpy() == 1
    interest = np.where(flag_values.any(axis=1), flag_values.argmax(axis=1), 0)
    item_ids = items["id"].to_numpy(np.int64)

    user_path = root / "u.user"
    users, _ = _load(user_path, ["id", "age", "gender", "occupation", "zip"], "|", ["id", "age"], max_bad=max_bad)
    user_ids = users["id"].to_numpy(np.int64)
    gender = users["gender"].str.strip().str.lower()
    occupation = users["occupation"].str.strip()
    return RawTables(
        users=pd.DataFrame(
            {
                "user_id": user_ids,
                "age": users["age"].to_numpy(np.int64),
                "gender": gender.where(gender.isin(["f", "m"]), "u").to_numpy(object),
                "segment": occupation.where(occupation != "", "unknown").to_numpy(object),
                "signup_at": _signup(ratings, user_ids),
            }
        ),
        interests=pd.DataFrame({"interest_id": np.arange(len(ML100K_GENRES), dtype=np.int64), "name": ML100K_GENRES}),
        pins=_pins(item_ids, interest, items["title"], ratings),
        events=_events(data_path, ratings, n_ratings, user_ids, item_ids, max_bad),
    )


def _ingest_latest(root: Path, max_bad: float) -> RawTables:
    _require(root, LATEST_FILES, "ml-latest")
    rating_cols = ["user", "item", "rating", "ts"]
    ratings_path = root / "ratings.csv"
    ratings, n_ratings = _load(
        ratings_path, rating_cols, ",", ["user", "item", "ts"], ("rating",), header="userId,movieId,rating,timestamp",
        max_bad=max_bad,
    )

    movies_path = root / "movies.csv"
    movies, _ = _load(movies_path, ["id", "title", "genres"], ",", ["id"], header="movieId,title,genres",
                      max_bad=max_bad)
    return _tables(ratings_path, ratings, n_ratings, movies, _anonymous_users(ratings), max_bad)


def _ingest_dat(root: Path, max_bad: float) -> RawTables:
    _require(root, DAT_FILES, "ML-1M/10M")
    ratings_path = root / "ratings.dat"
    ratings, n_ratings = _load(ratings_path, ["user", "item", "rating", "ts"], DAT_SEP, ["user", "item", "ts"],
                               ("rating",), encoding="latin-1", max_bad=max_bad)
    movies, _ = _load(root / "movies.dat", ["id", "title", "genres"], DAT_SEP, ["id"], encoding="latin-1",
                      max_bad=max_bad)
    users_path = root / DAT_USERS
    if not users_path.is_file():
        return _tables(ratings_path, ratings, n_ratings, movies, _anonymous_users(ratings), max_bad)
    users, _ = _load(users_path, ["id", "gender", "age", "occupation", "zip"], DAT_SEP, ["id", "age", "occupation"],
                     encoding="latin-1", max_bad=max_bad)
    user_ids = users["id"].to_numpy(np.int64)
    gender = users["gender"].str.strip().str.lower()
    code = users["occupation"].to_numpy(np.int64)
    known = (code >= 0) & (code < len(ML1M_OCCUPATIONS))
    names = np.array(ML1M_OCCUPATIONS, dtype=object)[np.where(known, code, 0)]
    profile = pd.DataFrame(
        {
            "user_id": user_ids,
            "age": users["age"].to_numpy(np.int64),
            "gender": gender.where(gender.isin(["f", "m"]), "u").to_numpy(object),
            "segment": np.where(known, names, "unknown").astype(object),
            "signup_at": _signup(ratings, user_ids),
        }
    )
    return _tables(ratings_path, ratings, n_ratings, movies, profile, max_bad)


def _anonymous_users(ratings: pd.DataFrame) -> pd.DataFrame:
    """Users of a layout without a users file: every rater, age 0, gender 'u', segment 'unknown'."""
    user_ids = np.unique(ratings["user"].to_numpy(np.int64))
    n_users = len(user_ids)
    return pd.DataFrame(
        {
            "user_id": user_ids,
            "age": np.zeros(n_users, dtype=np.int64),
            "gender": np.full(n_users, "u", dtype=object),
            "segment": np.full(n_users, "unknown", dtype=object),
            "signup_at": _signup(ratings, user_ids),
        }
    )


def _tables(ratings_path: Path, ratings: pd.DataFrame, n_ratings: int, movies: pd.DataFrame, users: pd.DataFrame,
            max_bad: float) -> RawTables:
    """The raw tables of a layout whose movies list their genres by name, joined by '|' (``movies``: id, title,
    genres): interests = 'unknown' then the genre names in alphabetical order, a movie's = its first genre."""
    genre_lists = movies["genres"].str.split("|")
    names = {g.strip() for gs in genre_lists for g in gs} - {LATEST_NO_GENRE, UNKNOWN_GENRE, ""}
    genres = [UNKNOWN_GENRE, *sorted(names)]
    genre_id = {g: i for i, g in enumerate(genres)}
    interest = np.array([genre_id.get(gs[0].strip(), 0) for gs in genre_lists], dtype=np.int64)
    movie_ids = movies["id"].to_numpy(np.int64)
    return RawTables(
        users=users,
        interests=pd.DataFrame({"interest_id": np.arange(len(genres), dtype=np.int64), "name": genres}),
        pins=_pins(movie_ids, interest, movies["title"], ratings),
        events=_events(ratings_path, ratings, n_ratings, users["user_id"].to_numpy(np.int64), movie_ids, max_bad),
    )
