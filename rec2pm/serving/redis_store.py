"""``redis://HOST:PORT/DB``: records in Redis hashes (``version``, ``blob``), CAS in a Lua script.

The script checks every user's version and then writes the batch, atomically (Redis runs
a script without interleaving other commands).  Keys are ``rec2pm:user:<id>``; on a Redis
Cluster a batch would have to share a hash slot, which this store does not arrange.

Durability is the server's: with ``appendonly yes`` and ``appendfsync everysec`` a crash
of the machine can lose about the last second of acknowledged writes; with ``always`` none;
with snapshots only (RDB) everything since the last snapshot.
"""

from __future__ import annotations

from .errors import StoreError, VersionConflict
from .record import user_key
from .store import MemoryStore, PutResult

PREFIX = "rec2pm:user:"

# ARGV per key: expected version, new version, new blob.  Returns {0, n, the n unchanged
# indices, then the superseded ones} or {1, conflicting index, stored version}: the rules of
# store.plan_writes (a batch holding a replay landed whole; its users stored at a later
# version were written over since).
CAS_SCRIPT = """
local unchanged, later, stored_versions = {}, {}, {}
for i = 1, #KEYS do
  local stored = redis.call('HMGET', KEYS[i], 'version', 'blob')
  local version = stored[1] and tonumber(stored[1]) or 0
  stored_versions[i] = version
  if version ~= tonumber(ARGV[3 * i - 2]) then
    if stored[2] == ARGV[3 * i] then
      unchanged[#unchanged + 1] = i
    elseif version >= tonumber(ARGV[3 * i - 1]) then
      later[#later + 1] = i
    else
      return {1, i, version}
    end
  end
end
if #later > 0 and #unchanged == 0 then
  return {1, later[1], stored_versions[later[1]]}
end
local skip = {}
for _, i in ipairs(unchanged) do skip[i] = true end
for _, i in ipairs(later) do skip[i] = true end
for i = 1, #KEYS do
  if not skip[i] then
    redis.call('HSET', KEYS[i], 'version', ARGV[3 * i - 1], 'blob', ARGV[3 * i])
  end
end
local out = {0, #unchanged}
for _, i in ipairs(unchanged) do out[#out + 1] = i end
for _, i in ipairs(later) do out[#out + 1] = i end
return out
"""


class RedisStore(MemoryStore):
    def __init__(self, url: str, *, socket_timeout: float = 10.0):
        try:
            import redis
        except ImportError:
            raise StoreError(f"store URL {url!r} needs redis-py: pip install redis") from None
        self.url = url
        self._redis = redis
        try:
            self._client = redis.Redis.from_url(
                url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
            )
            self._client.ping()
        except (redis.RedisError, ValueError) as exc:
            raise StoreError(f"store URL {url!r}: cannot reach the Redis server ({exc})") from None
        self._cas = self._client.register_script(CAS_SCRIPT)

    def _call(self, what, fn):
        try:
            return fn()
        except self._redis.RedisError as exc:
            raise StoreError(f"{self.url}: {what} failed ({type(exc).__name__}: {exc})") from None

    def _get_blobs(self, keys):
        def read():
            pipe = self._client.pipeline(transaction=True)  # MULTI/EXEC: one snapshot
            for key in keys:
                pipe.hget(PREFIX + key, "blob")
            return pipe.execute()

        return {key: blob for key, blob in zip(keys, self._call("get_many", read), strict=True) if blob is not None}

    def versions(self, user_ids):
        """The ``version`` fields the compare-and-swap script checks (a damaged blob header
        must not make a backfill's expected version disagree with them forever)."""
        keys = list(dict.fromkeys(user_key(u) for u in user_ids))

        def read():
            pipe = self._client.pipeline(transaction=True)
            for key in keys:
                pipe.hget(PREFIX + key, "version")
            return pipe.execute()

        stored = self._call("versions", read) if keys else []
        return {key: int(version) for key, version in zip(keys, stored, strict=True) if version is not None}

    def _put(self, writes):
        args = []
        for write in writes:
            args += [write.expected_version, write.record.version, write.record.encode()]
        reply = self._call("put_many", lambda: self._cas(keys=[PREFIX + w.record.user for w in writes], args=args))
        if int(reply[0]) == 1:
            user = writes[int(reply[1]) - 1].record.user
            expected = writes[int(reply[1]) - 1].expected_version
            raise VersionConflict([user], f"user {user!r} expected version {expected}, stored {int(reply[2])}")
        count = int(reply[1])
        unchanged = [int(i) - 1 for i in reply[2 : 2 + count]]
        superseded = [int(i) - 1 for i in reply[2 + count :]]
        skipped = set(unchanged) | set(superseded)
        return PutResult(
            written=[w.record.user for i, w in enumerate(writes) if i not in skipped],
            unchanged=[writes[i].record.user for i in sorted(unchanged)],
            superseded=[writes[i].record.user for i in sorted(superseded)],
        )

    def users(self):
        keys = self._call("users", lambda: list(self._client.scan_iter(match=PREFIX + "*", count=1000)))
        return sorted(k.decode()[len(PREFIX) :] for k in keys)

    def delete_all_for_tests(self) -> None:
        for user in self.users():
            self._client.delete(PREFIX + user)

    def corrupt_for_tests(self, user_id, offset: int = -1) -> None:
        key = PREFIX + str(user_id)
        blob = bytearray(self._client.hget(key, "blob"))
        blob[offset] ^= 0xFF
        self._client.hset(key, "blob", bytes(blob))

    def close(self):
        self._client.close()
