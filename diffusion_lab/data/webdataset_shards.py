"""WebDataset shards for CaptionedImageDataModule: tar files as img2dataset writes them, where sample
`<key>` is `<key>.jpg|jpeg|png|webp` plus its caption `<key>.txt` (a `<key>.json` is ignored).

`data.root` (and `data.val_root`) is a brace pattern (`shards/{0000..0003}.tar`), one .tar, or a
folder of .tar files. Without data.val_root the first shard (sorted) is held out for validation.

Counting, and the eager checks: at setup every local shard's tar headers are read (no image is
decoded; a few header reads per sample). That gives the sample count the epoch length needs, and
finds shards that are unreadable and keys without an image or a txt, so `raise` fails before
training and `skip` leaves them out. A shard cut short (no end-of-archive marker after its last
file, or that file cut) is a DataError naming it and the byte where it ends under `raise`; under
`skip` it is listed with the sample the cut runs through, and its complete samples are used.
`data.num_samples` skips the listing of the train shards (remote or huge ones) and trusts the
number, so a cut in those shards goes unseen. Caption text and image bytes are checked lazily
as the stream decodes them; `skip` drops the sample and the next good one takes its place.

DDP: train shards are split by rank and then by worker (as webdataset's `split_by_node` and
`split_by_worker` do, but with the rank passed in from the trainer), so ranks read disjoint shards.
Every rank must run the same number of batches or the others wait forever at the epoch's end, so
each worker's stream is `.repeat()`ed and cut with `.with_epoch(ceil(N / workers) * per-rank batch)`,
N = num_samples // global batch: a rank whose shards hold fewer samples pads by repeating them.
That needs a shard per (rank, worker); with fewer shards the worker count is lowered, with a warning.
Validation shards are few, so each (rank, worker) reads all of them and keeps every
(world * workers)-th sample, padded the same way to full batches (a few samples are seen twice, as
DistributedSampler pads).
A mid-epoch resume starts the epoch's stream afresh: an IterableDataset has no sampler to skip with.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import logging
import math
import tarfile
from pathlib import Path
from typing import NamedTuple

import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.tariterators import base_plus_ext

from diffusion_lab.data.bad_samples import BadSample, BadSamples, EvalLoader
from diffusion_lab.data.decode import caption_list, collate, load_image
from diffusion_lab.errors import ConfigError, DataError

log = logging.getLogger("diffusion_lab")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class Shards(NamedTuple):
    urls: list[str]
    num_samples: int
    bad: BadSamples
    cut: frozenset[str] = frozenset()  # shards found truncated at setup (their complete samples are used)


def shard_pattern(key: str) -> str:
    """A shard pattern as typed in a shell: Hydra's override parser reads braces itself, so the value
    needs quotes that reach it, inside quotes for the shell."""
    return f""""{key}='<dir>/{{00000..00009}}.tar'" (both quotes)"""


def shard_urls(root: str, key: str) -> list[str]:
    path = Path(root).expanduser()
    urls = sorted(map(str, path.glob("*.tar"))) if path.is_dir() else wds.shardlists.expand_urls(root)
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing or not urls:
        problem = f"names {missing[0]}, which does not exist" if missing else "holds no .tar file"
        raise DataError(
            f"{key}={root!r} {problem}. Point it at img2dataset shards: a folder of .tar files or a "
            f"pattern, {shard_pattern(key)}."
        )
    return urls


class Listing(NamedTuple):
    samples: dict[str, set[str]]  # key -> file extensions, in tar order, grouped as webdataset groups them
    cut: str | None  # where the shard is cut short ("at byte N, after <file>"); None when it is whole
    lost: str | None  # the key of the sample the cut runs through, when the tar shows one


def read_listing(url: str) -> Listing:
    """A shard's samples from its tar headers, and where it is cut short.

    tarfile stops without a word where a shard is cut between two members, and so does webdataset's
    stream, so a shard counts as whole only when its last member's data is all there and the
    end-of-archive marker (a zero block) follows it. Raises tarfile.ReadError when not even the first
    header can be read.
    """
    size = Path(url).stat().st_size
    members = []
    with tarfile.open(url) as tar, contextlib.suppress(tarfile.ReadError):
        members.extend(tar)  # up to a header or data cut short: the checks below say where
    samples: dict[str, set[str]] = {}
    for member in members:
        key, ext = base_plus_ext(member.name)
        if key is not None and member.isfile():
            samples.setdefault(key, set()).add(ext.lower())
    if not members:
        return Listing(samples, None, None)
    last = members[-1]
    end = last.offset_data + last.size
    if end > size:
        cut = f"at byte {size}, inside {last.name} (whose data ends at byte {end})"
    else:
        with open(url, "rb") as f:
            f.seek(end + -end % tarfile.BLOCKSIZE)  # file data is padded to whole blocks
            whole = f.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE)
        cut = None if whole else f"at byte {size}, after {last.name}"
    # The cut runs through the last sample when one of its files is cut short or missing: it is lost.
    final = next(reversed(samples), None)
    files = samples.get(final, set())
    whole_sample = end <= size and bool(files & set(IMAGE_EXTS)) and "txt" in files
    return Listing(samples, cut, final if cut and final and not whole_sample else None)


def count_samples(url: str, bad: BadSamples) -> tuple[int | None, bool]:
    """(good samples in one shard, from its tar headers, or None for a shard left out under skip;
    whether it is cut short). A cut shard's complete samples count; the one the cut runs through is lost."""
    try:
        samples, cut, lost = read_listing(url)
    except (tarfile.TarError, OSError) as err:
        bad.fail(url, BadSample(f"is not a readable tar shard ({err})"))
        return None, False
    if cut:
        bad.fail(url, BadSample(
            f"is truncated {cut}, before the tar's end-of-archive marker: the samples after the cut are "
            "lost, how many the tar cannot tell"
        ))  # fmt: skip
    good = 0
    for key, exts in samples.items():
        if key == lost:
            bad.fail(f"{url}:{key}", BadSample(f"is lost: the shard is cut {cut}"))
        elif not exts & set(IMAGE_EXTS):
            bad.fail(f"{url}:{key}", BadSample(f"has no image ({'/'.join(IMAGE_EXTS)}) in the shard"))
        elif "txt" not in exts:
            bad.fail(f"{url}:{key}", BadSample("has no txt caption in the shard"))
        else:
            good += 1
    return good, bool(cut)


def counted(urls: list[str], bad: BadSamples, num_samples: int | None = None) -> Shards:
    if num_samples is not None:
        return Shards(urls, num_samples, bad)
    counts = {url: count_samples(url, bad) for url in urls}
    return Shards(
        [u for u, (n, _) in counts.items() if n is not None],
        sum(n or 0 for n, _ in counts.values()),
        bad,
        frozenset(u for u, (_, cut) in counts.items() if cut),
    )


def setup(hp, bad: BadSamples) -> tuple[Shards, Shards]:
    """(train, val) shards of the DataModule's hyperparameters `hp`, counted."""
    urls = shard_urls(str(hp.root), "data.root")
    if hp.val_root:
        val_urls = shard_urls(str(hp.val_root), "data.val_root")
    elif len(urls) > 1:
        val_urls, urls = urls[:1], urls[1:]
        log.info("data: no data.val_root, so the first shard %s is held out for validation", val_urls[0])
    else:
        raise ConfigError(f"data.root={hp.root!r} is a single shard: set data.val_root to validation shards.")
    return counted(urls, bad, hp.num_samples), counted(val_urls, bad)


class Decode:
    """Pipeline stage: tar samples → items `{"image", "caption"}`. Under skip a bad sample is dropped
    and reported with the next good item (the loader collects it in the main process)."""

    def __init__(self, size: int, channels: int, bad: BadSamples):
        self.size, self.mode, self.bad = size, "L" if channels == 1 else "RGB", bad

    def __call__(self, samples):
        skipped = []
        for sample in samples:
            name = f"{sample.get('__url__')}:{sample.get('__key__')}"
            try:
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if ext is None:
                    raise BadSample(f"has no image ({'/'.join(IMAGE_EXTS)}) in the shard")
                text = sample["txt"].decode("utf-8", "replace") if "txt" in sample else None
                item = {"caption": caption_list(text)[0], "_id": sample["__key__"]}  # seeds its maps
                item["image"] = load_image(io.BytesIO(sample[ext]), self.size, self.mode)
            except BadSample as err:
                self.bad.fail(name, err)  # raises under data.on_bad_sample=raise
                skipped.append((name, str(err)))
                continue
            item["_bad"], skipped = skipped, []
            yield item


class EndAtCut:
    """webdataset's exception handler: a tar error in a shard found truncated at setup (listed there
    under skip) ends that shard's stream, keeping its complete samples; any other error is raised."""

    def __init__(self, cut: frozenset[str]):
        self.cut = cut

    def __call__(self, exn: Exception) -> bool:
        # webdataset calls this again with the shard's url appended to the args when the tar is done.
        if isinstance(exn, tarfile.TarError) and exn.args and exn.args[-1] in self.cut:
            return True
        raise exn


class ByRank:
    """Keep every `world`-th item from `rank` on: webdataset's split_by_node, with the rank passed in
    rather than read from torch.distributed, which a spawned (or forkserver) worker has not set up."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, items):
        yield from itertools.islice(items, self.rank, None, self.world)


def by_worker_samples(samples):
    """Keep this worker's share of the samples (validation: each process reads every shard)."""
    _, _, worker, workers = wds.utils.pytorch_worker_info()
    yield from itertools.islice(samples, worker, None, workers)


class Epoch(IterableDataset):
    """One epoch of a pipeline, with the `__len__` Lightning reads (webdataset's with_length builds a
    class at run time that spawned loader workers cannot unpickle)."""

    def __init__(self, pipeline, length: int, train: bool, bad: BadSamples):
        self.pipeline, self.length, self.train, self.bad = pipeline, length, train, bad

    def __iter__(self):
        return iter(self.pipeline)

    def __len__(self) -> int:
        return self.length


def loader(shards: Shards, train: bool, world: int, rank: int, hp) -> EvalLoader:
    """A loader that yields the same number of full batches on every rank (module docstring)."""
    batch, workers = hp.batch_size // world, hp.num_workers
    if train and len(shards.urls) < world * max(1, workers):
        if len(shards.urls) < world:
            raise DataError(
                f"data.root has {len(shards.urls)} shards for {world} processes: each needs one. "
                "Write smaller shards (img2dataset --number_sample_per_shard) or use fewer processes."
            )
        workers = len(shards.urls) // world
        log.warning(
            "data: %d train shards over %d processes: %d loader workers each",
            len(shards.urls),
            world,
            workers,
        )
    streams = max(1, workers)  # per rank: the main process or each worker reads one stream
    if train:
        batches = shards.num_samples // (world * batch)  # per rank
        if batches == 0:
            raise ConfigError(
                f"data.batch_size={hp.batch_size} is more than the {shards.num_samples} train samples."
            )
        per_stream = math.ceil(batches / streams) * batch
        data = wds.WebDataset(
            shards.urls, nodesplitter=ByRank(rank, world), workersplitter=wds.split_by_worker,
            shardshuffle=len(shards.urls), detshuffle=True, seed=hp.split_seed, empty_check=False,
            handler=EndAtCut(shards.cut),
        ).compose(wds.detshuffle(hp.shuffle_buffer, seed=hp.split_seed))  # fmt: skip
    else:
        per_stream = math.ceil(shards.num_samples / (world * streams) / batch) * batch
        data = wds.WebDataset(
            shards.urls, nodesplitter=None, workersplitter=None, shardshuffle=False, empty_check=False,
            handler=EndAtCut(shards.cut),
        ).compose(ByRank(rank, world), by_worker_samples)  # fmt: skip
    if per_stream == 0:  # with_epoch(0) would mean "no limit"
        raise DataError(f"{shards.urls} hold no usable samples: see the bad samples logged above.")
    # Repeat each stream and cut it at the same length everywhere: equal batch counts on every rank.
    data = data.compose(Decode(hp.image_size, hp.channels, shards.bad)).repeat().with_epoch(per_stream)
    return EvalLoader(
        Epoch(data, per_stream * streams, train, shards.bad),  # len(loader): this rank's batches
        batch_size=batch,
        num_workers=workers,
        collate_fn=functools.partial(collate, conditions=hp.conditions, seed=hp.condition_seed),
        persistent_workers=workers > 0,
    )
