"""Building a data set from image search: one query per item x attribute, the attribute is the class."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from imgclf.config import DataToolsConfig
from imgclf.datatools.download import (
    LIST_COLUMNS,
    URL_LIST_FILE,
    DownloadReport,
    UrlEntry,
    check_class_folders,
    check_label,
    download,
    read_sources,
    read_url_list,
    write_url_list,
)
from imgclf.datatools.fetch import RetryPolicy, make_client
from imgclf.datatools.journal import holding_folder
from imgclf.datatools.providers import Provider, ProviderError, make_provider
from imgclf.utils import make_folder

QUERIES_SHOWN = 5  # searches that found nothing, named in the summary


@dataclass
class ScrapeReport:
    """The URL list written (the ``kept`` entries of an earlier list first), the number of distinct URLs
    ``found`` by this run's searches, searches that failed (query, reason) and the download's outcome."""

    url_list: Path
    entries: list[UrlEntry]
    found: int
    kept: int = 0
    search_failures: list[tuple[str, str]] = field(default_factory=list)
    download: DownloadReport | None = None
    attributes: list[str] = field(default_factory=list)
    queries: list[tuple[str, str]] = field(default_factory=list)  # (query, label) searched
    empty_queries: list[str] = field(default_factory=list)  # searches that found no image URL

    def summary(self) -> str:
        line = f"{self.found} distinct image URLs found; list: {self.url_list}"
        if self.kept:
            line += f" ({self.kept} entries of earlier runs kept, {len(self.entries) - self.kept} new added)"
        lines = [line]
        lines += [f"search failed: {reason}" for _, reason in self.search_failures]
        if self.empty_queries:
            shown = ", ".join(map(repr, self.empty_queries[:QUERIES_SHOWN]))
            more = (
                f" and {len(self.empty_queries) - QUERIES_SHOWN} more"
                if len(self.empty_queries) > QUERIES_SHOWN
                else ""
            )
            lines.append(f"searches that found no image (a misspelt item?): {shown}{more}")
        listed, failed = {e.label for e in self.entries}, {q for q, _ in self.search_failures}
        for a in (a for a in self.attributes if a not in listed):
            own = [q for q, label in self.queries if label == a]
            if n_failed := sum(q in failed for q in own):
                why = f"{n_failed} of its {len(own)} searches failed (above): the same command again retries them"
            else:
                why = "its searches found nothing, or only images listed under an earlier attribute: see the note column of the list"
            lines.append(f"warning: no image listed for {a!r}: its class folder stays empty ({why})")
        if self.download is not None:
            lines.append(self.download.summary())
        return "\n".join(lines)


def parse_terms(text: str, what: str) -> list[str]:
    """Comma-separated terms, stripped and without repeats; ValueError if none."""
    terms = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not terms:
        raise ValueError(f"{what}: give at least one term, separated by commas (e.g. striped,dotted)")
    return terms


def build_queries(items: Sequence[str], attributes: Sequence[str]) -> list[tuple[str, str]]:
    """(query, label) for every attribute x item: ("striped blouse", "striped")."""
    return [(f"{attr} {item}", check_label(attr, "--attributes")) for attr in attributes for item in items]


def collect(
    provider: Provider, queries: Sequence[tuple[str, str]], per_query: int, progress: bool = False
) -> tuple[list[UrlEntry], list[tuple[str, str]], list[str]]:
    """Search every query; each URL is listed once, under the first query's label, later finds noted. Returns
    the entries, the failed searches (query, reason) and the queries that found no image URL.

    A failed search (whatever the error) is a failure of its query only; results without a URL are dropped."""
    found: dict[str, tuple[UrlEntry, list[str]]] = {}
    failures, empty = [], []
    for n, (query, label) in enumerate(tqdm(queries, unit="query", desc="search", disable=None if progress else True)):
        try:
            results = provider.search(query, per_query)
        except KeyboardInterrupt:  # the searches done are kept (a rate-limited service counts them)
            raise SearchInterrupted(_entries(found), n, len(queries)) from None
        except ProviderError as e:
            failures.append((query, str(e)))
            continue
        except Exception as e:  # noqa: BLE001 - one odd answer (or a provider's bug) must not lose the others
            failures.append((query, f"{provider.name} search for {query!r} failed: {type(e).__name__}: {e}"))
            continue
        if not any(UrlEntry(label, r.url).url for r in results):
            empty.append(query)
        for r in results:
            entry = UrlEntry(label, r.url, r.source_page, r.licence, r.creator, r.title)  # URL trimmed here
            if not entry.url:
                continue
            if entry.url in found:
                if found[entry.url][1][0] != f"query {query!r}":  # not a provider repeating a URL in one answer
                    found[entry.url][1].append(f"also found for {query!r}")
            else:
                found[entry.url] = (entry, [f"query {query!r}"])
    return _entries(found), failures, empty


def _entries(found: dict[str, tuple[UrlEntry, list[str]]]) -> list[UrlEntry]:
    """The entries found, each with its notes (the query that found it first, the others)."""
    return [
        UrlEntry(e.label, e.url, e.source_page, e.licence, e.creator, e.title, "; ".join(dict.fromkeys(notes)))
        for e, notes in found.values()
    ]


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C while searching: the entries the searches done found (:func:`scrape` adds them to its list)."""

    def __init__(self, entries: list[UrlEntry], done: int, total: int, message: str = "") -> None:
        super().__init__(message or f"interrupted after {done} of {total} searches")
        self.entries, self.done, self.total = entries, done, total


@holding_folder("out")
def scrape(
    items: Sequence[str],
    attributes: Sequence[str],
    out: Path,
    cfg: DataToolsConfig,
    max_pixels: int = 100_000_000,
    progress: bool = True,
    provider: Provider | None = None,
) -> ScrapeReport:
    """Search, add the URLs found to ``<out>/urls.tsv``, then download that list into ``<out>/<attribute>/``.

    An earlier ``urls.tsv`` is kept: its entries stay first, URLs it lacks are appended, and the whole list
    is downloaded (see :func:`download`: files already there are skipped, earlier failures are tried again).
    The folder and the earlier list are checked before searching. Raises ProviderError when every search
    failed (nothing to download; the list is left as it was).
    """
    out = Path(out)
    queries = build_queries(items, attributes)
    make_folder(out, "data folder", "--out")
    url_list = out / URL_LIST_FILE
    earlier = _earlier_list(url_list) if url_list.exists() else []
    read_sources(out)  # checked before searching, as the download would
    check_class_folders(out, attributes)
    with make_client(cfg.timeout_s) as client:
        provider = provider or make_provider(
            cfg.provider, client, cfg.provider_url, RetryPolicy(cfg.retries, cfg.backoff_s, cfg.max_backoff_s)
        )
        try:
            entries, failures, empty = collect(provider, queries, cfg.per_query, progress)
        except SearchInterrupted as e:
            added = _new(earlier, e.entries)
            if added:
                write_url_list(url_list, [*earlier, *added])
            said = f"interrupted after {e.done} of {e.total} searches, before downloading: "
            if added or earlier:
                said += (
                    f"{len(added)} new URL(s) found, added to {url_list}; `imgclf download {shlex.quote(str(url_list))} "
                    f"--out {shlex.quote(str(out))}` downloads the list, the same scrape again searches everything again"
                )
            else:
                said += "no URL found yet, nothing written; the same scrape again searches everything"
            raise SearchInterrupted(e.entries, e.done, e.total, said) from None
    if len(failures) == len(queries):
        raise ProviderError(f"every search failed, nothing downloaded; first error: {failures[0][1]}")
    merged = [*earlier, *_new(earlier, entries)]
    report = ScrapeReport(
        url_list,
        merged,
        len(entries),
        len(earlier),
        failures,
        attributes=list(attributes),
        queries=queries,
        empty_queries=empty,
    )
    write_url_list(url_list, merged)
    report.download = download(merged, out, cfg, max_pixels, progress)
    return report


def _new(earlier: Sequence[UrlEntry], found: Sequence[UrlEntry]) -> list[UrlEntry]:
    """The entries ``found`` whose URLs the ``earlier`` list lacks (a URL found again stays where it was)."""
    listed = {e.url for e in earlier}
    return [e for e in found if e.url not in listed]


def _earlier_list(path: Path) -> list[UrlEntry]:
    """The entries of the URL list an earlier scrape left at ``path``; ValueError saying what to do, also where
    the file is not one scrape wrote (it is rewritten: another's comments and columns would be lost)."""
    header = "# " + "\t".join(LIST_COLUMNS)
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        first = f.readline().rstrip("\r\n")
    if first != header:
        raise ValueError(
            f"{path} is not the URL list of an earlier scrape (its first line is not {header!r}); scrape adds its "
            "results to that file and rewrites it: move yours away (`imgclf download` takes it), or give another --out"
        )
    try:
        return read_url_list(path)
    except ValueError as e:
        raise ValueError(
            f"{path}, the URL list of an earlier scrape (new results are added to it), cannot be read; fix it, "
            f"or give another --out: {e}"
        ) from e
