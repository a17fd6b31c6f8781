"""The ``keys`` and ``usage`` commands of ``auxot_router.py``.

They work on the same store a running router reads: the keys file in the data directory (or
``AUXOT_KEYS_FILE``) with the embedded queue, Redis when ``AUXOT_REDIS_URL`` is set. A running
router takes up a change within ``AUXOT_KEYS_REFRESH`` (2 s). A key is printed once, on ``add``;
only its Argon2id hash is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis

from auxot_common.auth import API_KEY_PREFIX, GPU_KEY_PREFIX, generate_key, hash_key
from auxot_common.keys import (
    ADMIN_KEY_PREFIX,
    LIMIT_FIELDS,
    FileKeyStore,
    KeyRecord,
    KeyStore,
    KeyStoreError,
    RedisKeyStore,
    default_data_dir,
    keys_file_path,
    lookup_tag,
    validate_name,
    validate_settings,
)
from auxot_common.usage import FileUsage, RedisUsage, UsageStore

PREFIXES = {"api": API_KEY_PREFIX, "gpu": GPU_KEY_PREFIX, "admin": ADMIN_KEY_PREFIX}


class _Stores:
    """The key and usage stores the router of this environment uses."""

    def __init__(self, env: Mapping[str, str]) -> None:
        url = env.get("AUXOT_REDIS_URL", "")
        prefix = env.get("AUXOT_REDIS_PREFIX") or "auxot:"
        self.redis: Redis | None = Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10) if url else None
        self.keys: KeyStore
        self.usage: UsageStore
        if self.redis is not None:
            self.keys = RedisKeyStore(self.redis, prefix)
            self.usage = RedisUsage(self.redis, prefix)
        else:
            self.keys = FileKeyStore(keys_file_path(env))
            usage_file = env.get("AUXOT_USAGE_FILE") or str(default_data_dir(env) / "usage.json")
            self.usage = FileUsage(Path(usage_file).expanduser())

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()


def _limit(text: str) -> int | None:
    if text.lower() == "default":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a whole number or 'default'") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (0: no limit)")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="auxot_router.py keys", description="Manage named keys.")
    sub = parser.add_subparsers(dest="action", required=True)

    def role_flags(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--gpu", action="store_true", help="a GPU key (workers)")
        group.add_argument("--admin", action="store_true", help="an admin key (GET /admin/usage)")

    def limit_flags(p: argparse.ArgumentParser) -> None:
        hidden = argparse.SUPPRESS
        p.add_argument("--rpm", type=_limit, default=hidden, help="requests per minute (0: none, 'default')")
        p.add_argument("--tpm", type=_limit, default=hidden, help="tokens per minute, prompt + completion")
        p.add_argument("--concurrency", type=_limit, default=hidden, help="requests at once")
        p.add_argument("--daily-tokens", dest="daily_tokens", type=_limit, default=hidden, help="tokens per UTC day")
        p.add_argument("--priority", type=int, default=hidden, help="weight in the fair queue, 1-100 (default 1)")

    add = sub.add_parser("add", help="create a key and print it once")
    add.add_argument("name")
    role_flags(add)
    limit_flags(add)
    change = sub.add_parser("set", help="change a key's limits or priority")
    change.add_argument("name")
    role_flags(change)
    limit_flags(change)
    listing = sub.add_parser("list", help="list keys (never the key or its full hash)")
    listing.add_argument("--json", action="store_true")
    revoke = sub.add_parser("revoke", help="delete a key; routers refuse it within seconds")
    revoke.add_argument("name")
    role_flags(revoke)
    return parser


def _role(args: argparse.Namespace) -> str:
    return "gpu" if getattr(args, "gpu", False) else "admin" if getattr(args, "admin", False) else "api"


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (flags not given are absent: SUPPRESS)."""
    return validate_settings({name: getattr(args, name) for name in (*LIMIT_FIELDS, "priority") if hasattr(args, name)})


def _fmt_limit(value: int | None) -> str:
    return "default" if value is None else "none" if value == 0 else str(value)


def _fmt_time(ts: float | None) -> str:
    if not ts:
        return "never"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


async def _keys(argv: list[str], env: Mapping[str, str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    stores = _Stores(env)
    try:
        if args.action == "add":
            role = _role(args)
            name = validate_name(args.name)
            changes = _changes(args)
            key = generate_key(PREFIXES[role])
            record = KeyRecord(name=name, role=role, phc=hash_key(key), tag=lookup_tag(key), **changes)
            await stores.keys.add(record)
            print(f"{role} key {name!r} created. Save it now: it is not stored and will not be shown again.")
            print(key)
            return 0
        if args.action == "set":
            record = await stores.keys.update(_role(args), args.name, _changes(args))
            print(f"{record.role} key {record.name!r} updated: {_describe(record)}")
            return 0
        if args.action == "revoke":
            role = _role(args)
            if not await stores.keys.remove(role, args.name):
                print(f"no {role} key named {args.name!r}", file=sys.stderr)
                return 1
            print(f"{role} key {args.name!r} revoked; running routers refuse it within a few seconds")
            return 0
        records = sorted(await stores.keys.load(), key=lambda r: (r.role, r.name))
        last = await stores.usage.last_used()
        if args.json:
            out = [
                {
                    "name": r.name,
                    "role": r.role,
                    **{f: getattr(r, f) for f in LIMIT_FIELDS},
                    "priority": r.priority,
                    "created": r.created,
                    "last_used": last.get(r.name) if r.role == "api" else None,
                    "hash": r.phc[-8:],
                }
                for r in records
            ]
            print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
            return 0
        if not records:
            print("no named keys (add one: python auxot_router.py keys add NAME)")
            return 0
        header = (
            f"{'NAME':<20} {'ROLE':<6} {'RPM':>8} {'TPM':>9} {'CONC':>6} {'DAILY':>10} {'PRIO':>4}  "
            f"{'CREATED':<21} LAST USED"
        )
        print(header)
        for r in records:
            print(
                f"{r.name:<20} {r.role:<6} {_fmt_limit(r.rpm):>8} {_fmt_limit(r.tpm):>9} "
                f"{_fmt_limit(r.concurrency):>6} {_fmt_limit(r.daily_tokens):>10} {r.priority:>4}  "
                f"{_fmt_time(r.created):<21} {_fmt_time(last.get(r.name)) if r.role == 'api' else '-'}"
            )
        return 0
    except KeyStoreError as exc:
        print(f"keys: {exc}", file=sys.stderr)
        return 1
    finally:
        await stores.close()


def _describe(record: KeyRecord) -> str:
    limits = ", ".join(f"{f}={_fmt_limit(getattr(record, f))}" for f in LIMIT_FIELDS)
    return f"{limits}, priority={record.priority}"


def keys_command(argv: list[str], env: Mapping[str, str]) -> int:
    try:
        return asyncio.run(_keys(argv, env))
    except OSError as exc:
        print(f"keys: {exc}", file=sys.stderr)
        return 1


async def _usage(argv: list[str], env: Mapping[str, str]) -> int:
    parser = argparse.ArgumentParser(prog="auxot_router.py usage", description="Usage per key and UTC day.")
    parser.add_argument("--key", help="only this key")
    parser.add_argument("--since", help="from this UTC day on (YYYY-MM-DD)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.since is not None:
        try:
            dt.date.fromisoformat(args.since)
        except ValueError:
            print("usage: --since must be a date, YYYY-MM-DD", file=sys.stderr)
            return 2
    stores = _Stores(env)
    try:
        data = await stores.usage.query(key=args.key, since=args.since)
    finally:
        await stores.close()
    if args.json:
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(
        f"{'DAY':<10} {'KEY':<20} {'REQUESTS':>8} {'ERRORS':>6} {'REFUSED':>7} {'PROMPT':>10} {'CACHED':>10} "
        f"{'COMPLETION':>10} {'GPU_S':>9}"
    )
    for row in data:
        print(
            f"{row['day']:<10} {row['key']:<20} {row['requests']:>8} {row['errors']:>6} {row['rejected']:>7} "
            f"{row['prompt_tokens']:>10} {row['cached_tokens']:>10} {row['completion_tokens']:>10} "
            f"{row['gpu_seconds']:>9.1f}"
        )
    return 0


def usage_command(argv: list[str], env: Mapping[str, str]) -> int:
    try:
        return asyncio.run(_usage(argv, env))
    except OSError as exc:
        print(f"usage: {exc}", file=sys.stderr)
        return 1
