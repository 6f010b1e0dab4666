"""Hostile MXNet files: named cases and a seeded fuzzer, fed to the readers
under an address-space limit. tests/test_hostile_files.py runs it in a
subprocess; the longer fuzz run is

  python tests/hostile_files.py fuzz --seconds 3600 --seed 1

Each input prints one JSON line: its name, size, outcome ("read", or the
exception's class), message, seconds and (for named cases) the peak of
Python's allocations, the CPU seconds and the growth of the resident set
(its high-water mark, reset before each case). The process exits 1 if any
outcome is neither a read nor an optax_ftml.mxnet.FileError.

  python tests/hostile_files.py paths

reads paths that are not regular files (a FIFO, a directory, a device, a
symbolic link to a FIFO, a file of /proc) the same way.
"""

import argparse
import copyreg
import io
import json
import os
import pathlib
import pickle
import pickletools
import random
import resource
import struct
import sys
import tempfile
import time
import tracemalloc
import zipfile
import zlib

import numpy as np

from optax_ftml import mxnet
from optax_ftml.mxnet import _files
from optax_ftml.mxnet import _pickle

FIXTURES = pathlib.Path(__file__).parent / "mxnet_fixtures"
EXAMPLE = pathlib.Path(_files.__file__).parent / "example"
# Headroom over what the process holds after its imports: a 4 GB allocation
# fails as MemoryError instead of succeeding.
ADDRESS_SPACE_HEADROOM = 1 << 30
PROTO4 = b"\x80\x04"


def limit_address_space():
  status = pathlib.Path("/proc/self/status").read_text()
  in_use = int(status.split("VmSize:")[1].split()[0]) * 1024
  limit = in_use + ADDRESS_SPACE_HEADROOM
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  return limit


def binget(index):
  return b"j" + struct.pack("<I", index)


def array_bytes(array):
  """One array in NDArray::Save's format (the V2 magic, float32)."""
  return (struct.pack("<IIi", 0xF993FAC9, 0, array.ndim)
          + struct.pack(f"<{array.ndim}q", *array.shape)
          + struct.pack("<iii", 1, 0, 0) + array.astype("<f4").tobytes())


def params_file(shape, data=b""):
  """A one-array .params file with the given dims and raw data."""
  return (struct.pack("<QQQ", 0x112, 0, 1)
          + struct.pack("<IIi", 0xF993FAC9, 0, len(shape))
          + struct.pack(f"<{len(shape)}q", *shape) + struct.pack("<iii", 1, 0, 0)
          + data + struct.pack("<Q", 0))


def shared_lists(depth):
  """L_i = [L_{i-1}, L_{i-1}] by memo reuse: 2**depth elements as a tree.
  The outermost list is memoised first, so L_i's memo index is depth - i."""
  def build(i):
    if i == 0:
      return b"]\x94"
    return b"]\x94(" + build(i - 1) + binget(depth - i + 1) + b"e"
  return PROTO4 + b"}K\x00" + build(depth) + b"s."


def shared_tuple_key(depth):
  """T_i = (T_{i-1}, T_{i-1}) as a dict key: hashing it is 2**depth work."""
  def build(i):
    if i == 0:
      return b")\x94"
    return build(i - 1) + binget(i - 1) + b"\x86\x94"
  return PROTO4 + b"}" + build(depth) + b"K\x00s."


def shared_records(depth):
  """FTML records R_i with attributes a and b both R_{i-1}. The FTML class
  is memo 0, the outermost record memo 1."""
  def build(i):
    cls = (b"\x8c\x19mxnet.optimizer.optimizer\x8c\x04FTML\x93\x94"
           if i == depth else binget(0))
    if i == 0:
      return cls + b")\x81\x94}b"
    return (cls + b")\x81\x94}(\x8c\x01a" + build(i - 1) + b"\x8c\x01b"
            + binget(depth - i + 2) + b"ub")
  return PROTO4 + b"}K\x00" + build(depth) + b"s."


def blob_copies(copies, what):
  """One 1 MiB array's bytes memoised once and used ``copies`` times, as the
  argument of bytearray or as NDArrays' data."""
  blob = array_bytes(np.zeros(1 << 18, np.float32))
  definitions = (b"\x8c\x08builtins\x8c\tbytearray\x93\x94"
                 + b"B" + struct.pack("<I", len(blob)) + blob + b"\x94")
  copy = [definitions + b"\x85R", binget(0) + binget(1) + b"\x85R"]
  if what == "ndarray":
    ndarray = [b"\x8c\x15mxnet.ndarray.ndarray\x8c\x07NDArray\x93\x94",
               binget(0)]
    copy = [definitions + b"\x85R", binget(1) + binget(2) + b"\x85R"]
    copy = [n + b"N\x85R}\x8c\x06handle" + c + b"sb"
            for n, c in zip(ndarray, copy, strict=True)]
  return (PROTO4 + b"}K\x00](" + copy[0] + copy[1] * (copies - 1)
          + b"es.")


def with_extension():
  """EXT1 0xF0 once copyreg maps it to builtins.eval and pickle cached it."""
  copyreg.add_extension("builtins", "eval", 0xF0)
  try:
    assert pickle.loads(b"\x80\x02\x82\xf0.") is eval
  finally:
    copyreg.remove_extension("builtins", "eval", 0xF0)
    copyreg.add_extension("builtins", "eval", 0xF0)  # as a program would leave it
  return PROTO4 + b"}K\x00\x82\xf0\x8c\x0fopen('x', 'w')\x85Rs."


def npz(members, compression=zipfile.ZIP_STORED):
  """A zip of the given (name, bytes) members, as MXNet 2's .params."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w", compression) as archive:
    for name, data in members:
      archive.writestr(name, data)
  return buffer.getvalue()


def npy(array, shape=None):
  """A .npy of ``array``'s bytes, its header claiming ``shape``."""
  buffer = io.BytesIO()
  header = {"descr": np.lib.format.dtype_to_descr(array.dtype),
            "fortran_order": False, "shape": shape or array.shape}
  np.lib.format.write_array_header_1_0(buffer, header)
  return buffer.getvalue() + array.tobytes()


def local_header(name, data, flags=0, method=0, crc=None, sizes=None,
                 extra=b""):
  """A zip local file header (APPNOTE.TXT 4.3.7) for ``data``."""
  crc = zlib.crc32(data) if crc is None else crc
  packed, size = (len(data), len(data)) if sizes is None else sizes
  return struct.pack("<4sHHHIIIIHH", b"PK\x03\x04", 20, flags, method, 0, crc,
                     packed, size, len(name), len(extra)) + name + extra


def central_entry(name, data, offset, flags=0, method=0, crc=None, sizes=None,
                  extra=b""):
  """A zip central directory entry (APPNOTE.TXT 4.3.12) for ``data``."""
  crc = zlib.crc32(data) if crc is None else crc
  packed, size = (len(data), len(data)) if sizes is None else sizes
  return struct.pack("<4sHHHHIIIIHHHHHII", b"PK\x01\x02", 20, 20, flags,
                     method, 0, crc, packed, size, len(name), len(extra), 0, 0,
                     0, 0, offset) + name + extra


def end_record(count, cd_size, cd_offset, comment=b""):
  return struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, cd_size,
                     cd_offset, len(comment)) + comment


def zip_archive(body, entries, **end):
  """``body`` (the members), then the central directory ``entries``."""
  directory = b"".join(entries)
  return body + directory + end_record(len(entries), len(directory), len(body),
                                       **end)


def stored_zip(members):
  """A zip of stored (name, data) members, as written by the functions above
  (each piece can be replaced to make a damaged one)."""
  body, entries = b"", []
  for name, data in members:
    entries.append(central_entry(name, data, len(body)))
    body += local_header(name, data) + data
  return zip_archive(body, entries)


def shared_member_npz(entries, distinct_names=False):
  """One stored 1 MiB member, named by ``entries`` central directory entries
  that all point at it."""
  data = npy(np.zeros(1 << 18, np.float32))
  body = local_header(b"w.npy", data) + data
  names = [b"w%d.npy" % i if distinct_names and i else b"w.npy"
           for i in range(entries)]
  return zip_archive(body, [central_entry(n, data, 0) for n in names])


def zip64_member_npz(entries):
  """One stored ~1 MiB member with zip64 sizes, its central directory entry
  repeated ``entries`` times under the same name."""
  data = npy(np.zeros(1 << 18, np.float32))
  wide = (0xFFFFFFFF, 0xFFFFFFFF)
  extra = struct.pack("<HHQQ", 1, 16, len(data), len(data))
  body = local_header(b"w.npy", data, sizes=wide, extra=extra) + data
  entry = central_entry(b"w.npy", data, 0, sizes=wide, extra=extra)
  return zip_archive(body, [entry] * entries)


def nested_member_npz():
  """Two members with distinct names and valid CRCs whose bytes overlap: the
  second's local header and data lie inside the first's data."""
  inner_data = npy(np.zeros(4, np.float32))
  inner = local_header(b"b.npy", inner_data) + inner_data
  outer_data = npy(np.frombuffer(inner, np.uint8))
  inner_at = len(local_header(b"a.npy", outer_data)) + len(outer_data) - len(
      inner)
  body = local_header(b"a.npy", outer_data) + outer_data
  return zip_archive(body, [central_entry(b"a.npy", outer_data, 0),
                            central_entry(b"b.npy", inner_data, inner_at)])


def global_named(module, name):
  """A states file naming the global ``module``.``name`` (STACK_GLOBAL)."""
  def string(text):
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw
  return PROTO4 + b"}K\x00" + string(module) + string(name) + b"\x93s."


STATES = (FIXTURES / "gluon" / "trainer.states").read_bytes()

BUDGET = "budget of 32 bytes per byte"
# name -> (reader, bytes or a function making them, message expected).
CASES = {
    "deep tuple key": ("states", lambda: PROTO4 + b"})" + b"\x85" * 200_000
                       + b"K\x00s.", BUDGET),
    "memo index 2**28": ("states", lambda: PROTO4 + b"}r\x00\x00\x00\x10.",
                         "memo index 268435456 out of order"),
    "memo index 2**27": ("states", lambda: PROTO4 + b"}r\x00\x00\x00\x08.",
                         "memo index 134217728 out of order"),
    "shared lists, depth 30": ("states", lambda: shared_lists(30), BUDGET),
    "shared lists, depth 40": ("states", lambda: shared_lists(40),
                               "nested deeper than 32"),
    "shared tuple key, depth 40": ("states", lambda: shared_tuple_key(40),
                                   "dict key of type tuple"),
    "frozenset": ("states", lambda: PROTO4 + b"}K\x00(K\x01\x91s.",
                  "opcode FROZENSET"),
    "shared records, depth 60": ("states", lambda: shared_records(60),
                                 "nested deeper than 32"),
    "shared records, depth 14": ("states", lambda: shared_records(14), BUDGET),
    "one blob, 3000 NDArrays": ("states", lambda: blob_copies(3000, "ndarray"),
                                BUDGET),
    "one blob, 3000 bytearrays": ("states", lambda: blob_copies(3000, "bytes"),
                                  BUDGET),
    "an escape-decoded STRING argument": (
        "states", lambda: PROTO4 + b"}K\x00S'\\q'\ns.", "opcode STRING (0x53)"),
    "a text integer of 200,000 digits": (
        "states", lambda: PROTO4 + b"}K\x00I" + b"9" * 200_000 + b"\ns.",
        "opcode INT (0x49)"),
    "a BINUNICODE declaring 2**32-1 bytes": (
        "states", lambda: PROTO4 + b"}K\x00X\xff\xff\xff\xffabcs.",
        "declares 4294967295 bytes"),
    "300,000 empty lists": ("states", lambda: PROTO4 + b"}K\x00]("
                            + b"]" * 300_000 + b"es.", BUDGET),
    "258,240 memoised empty lists": ("states", lambda: PROTO4 + b"}K\x00]("
                                     + b"]\x94" * 258_240 + b"es.", BUDGET),
    "300,000 empty dicts": ("states", lambda: PROTO4 + b"}K\x00]("
                            + b"}" * 300_000 + b"es.", BUDGET),
    "a 100 kB string 1,000 times": ("states", lambda: PROTO4 + b"}K\x00]("
                                    + b"X" + struct.pack("<I", 100_000)
                                    + b"x" * 100_000 + b"\x94"
                                    + b"h\x00" * 999 + b"es.", BUDGET),
    "a class name of 400 escapes": (
        "states", lambda: global_named("\x1b[2J\n\u202e" * 100, "FTML"),
        "refused to load '\\x1b[2J\\n\\u202e"),
    "a class name with a lone surrogate": (
        "states", lambda: global_named("mxnet\udc80", "FTML"), "is not UTF-8"),
    "BUILD on bytearray": ("states", lambda: PROTO4 + b"cbuiltins\nbytearray\n"
                           b"(N}(\x8c\x0c__defaults__C\x05PWNED\x85utb0}.",
                           "BUILD on a _Global"),
    "EXT1 of a cached eval": ("states", with_extension, "opcode EXT1"),
    "persistent id": ("states", lambda: PROTO4 + b"}K\x00\x8c\x01xQs.",
                      "opcode BINPERSID"),
    "protocol 0": ("states", lambda: b"(dp0\nI0\nI1\ns.", "protocol 2 to 4"),
    "bool state index": ("states", lambda: PROTO4 + b"}\x88K\x01s.",
                         "dict key of type bool"),
    "list containing itself": ("states", lambda: PROTO4 + b"}K\x00]\x94h\x00a"
                               b"s.", "contains itself"),
    "integer of 255 bytes": ("states", lambda: PROTO4 + b"}K\x00\x8a\xff"
                             + b"\x01" * 255 + b"s.", "wider than 64 bits"),
    "trailing bytes after STOP": ("states", lambda: STATES + b"\0",
                                  "1 bytes after the pickle's end"),
    "params dims (2**32, 2**32)": ("params", lambda: params_file((2**32, 2**32)),
                                   "too many elements"),
    "params dims (2**20, 2**20)": ("params", lambda: params_file((2**20, 2**20)),
                                   "needs 4398046511104 bytes"),
    "params dims (0, 2**62)": ("params", lambda: params_file((0, 2**62)),
                               "too many elements"),
    "params with 65 dims": ("params", lambda: params_file((1,) * 65, b"\0" * 4),
                            "ndim 65"),
    "npz: a deflated zip bomb": ("params", lambda: npz(
        [("w.npy", npy(np.zeros(1 << 26, np.uint8)))], zipfile.ZIP_DEFLATED),
                                 "is compressed"),
    "npz: shape (2**40,) over 8 bytes": ("params", lambda: npz(
        [("w.npy", npy(np.zeros(2, np.float32), (2**40,)))]),
                                         "8 bytes of data for shape"),
    "npz: negative dims (-1, -2) over 8 bytes": ("params", lambda: npz(
        [("w.npy", npy(np.zeros(2, np.float32), (-1, -2)))]),
                                                "a negative dim"),
    "npz: a pickle in place of a .npy": ("params", lambda: npz(
        [("w.npy", pickle.dumps(np.array([eval], dtype=object)))]),
                                    "is not a NumPy array"),
    "npz: object dtype header": ("params", lambda: npz(
        [("w.npy", npy(np.zeros(2, np.float32)).replace(b"'<f4'", b"'|O' "))]),
                                 "unsupported dtype 'object'"),
    "npz: duplicate names": ("params", lambda: npz(
        [("w.npy", npy(np.zeros(2, np.float32)))] * 2), "duplicate names"),
    "npz: 3,000 entries over one 1 MiB member": (
        "params", lambda: shared_member_npz(3000), "overlaps the one before"),
    "npz: 3,000 names over one 1 MiB member": (
        "params", lambda: shared_member_npz(3000, distinct_names=True),
        "overlaps the one before"),
    "npz: one zip64 member under 1,500 entries": (
        "params", lambda: zip64_member_npz(1500), "overlaps the one before"),
    "npz: a member inside another's data": (
        "params", nested_member_npz, "overlaps the one before"),
    "npz: another file": ("params", lambda: npz([("w.txt", b"")]),
                          "other than .npy"),
}
READERS = {"states": mxnet.read_trainer_states, "params": mxnet.read_params}


def state_of_the_library():
  """What a file must not change: the reader modules' functions' defaults
  and attributes, and bytearray's behaviour."""
  state = {}
  for module in (_files, _pickle):
    for name, value in vars(module).items():
      if callable(value):
        state[f"{module.__name__}.{name}"] = (
            getattr(value, "__defaults__", None),
            sorted(getattr(value, "__dict__", {}).keys()))
  state["bytearray()"] = bytes(bytearray())
  return state


def resident_bytes(field):
  """VmRSS (now) or VmHWM (the high-water mark) of this process."""
  status = pathlib.Path("/proc/self/status").read_text()
  return int(status.split(f"{field}:")[1].split()[0]) * 1024


def read_once(reader, data):
  try:
    READERS[reader](data)
    return "read", ""
  except Exception as e:  # every other outcome is reported, then fails
    return type(e).__name__, str(e)[:2000]


def run_one(name, reader, data, measure):
  """One input: its outcome and wall-clock seconds; measured, also its CPU
  seconds and resident-set growth (a run of its own, the high-water mark
  reset first), then the peak of Python's allocations (under tracemalloc)."""
  result = {"name": name, "size": len(data)}
  if measure:
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    before, cpu = resident_bytes("VmRSS"), time.process_time()
    read_once(reader, data)
    result["cpu_seconds"] = round(time.process_time() - cpu, 4)
    result["resident_growth"] = max(0, resident_bytes("VmHWM") - before)
    tracemalloc.start()
  start = time.perf_counter()
  result["outcome"], result["message"] = read_once(reader, data)
  result["seconds"] = round(time.perf_counter() - start, 4)
  result["peak_bytes"] = tracemalloc.get_traced_memory()[1] if measure else None
  if measure:
    tracemalloc.stop()
  return result


def run_cases():
  before = state_of_the_library()
  results = []
  for name, (reader, make, _) in CASES.items():
    results.append(run_one(name, reader, make(), measure=True))
  changed = before != state_of_the_library()
  return results, changed


def run_paths():
  """Paths that are not regular files, and a symbolic link to one that is:
  each read by both readers."""
  results = []
  with tempfile.TemporaryDirectory() as directory:
    root = pathlib.Path(directory)
    os.mkfifo(root / "fifo")
    (root / "link to fifo").symlink_to(root / "fifo")
    (root / "link to model").symlink_to(EXAMPLE / "model.params")
    paths = {"a FIFO": root / "fifo", "a directory": root,
             "a character device": pathlib.Path("/dev/zero"),
             "a symbolic link to a FIFO": root / "link to fifo",
             "a file of /proc": pathlib.Path("/proc/self/status"),
             "a symbolic link to a parameter file": root / "link to model"}
    for name, path in paths.items():
      for reader in READERS:
        start = time.perf_counter()
        outcome, message = read_once(reader, path)
        results.append({"name": name, "reader": reader, "outcome": outcome,
                        "message": message,
                        "seconds": round(time.perf_counter() - start, 4)})
  return results


def fixtures():
  files = sorted(FIXTURES.rglob("*.states")) + sorted(FIXTURES.rglob("*.pkl"))
  files += [EXAMPLE / "trainer.states"]
  params = [*sorted(FIXTURES.rglob("*.params")), EXAMPLE / "model.params"]
  return ([("states", f.read_bytes()) for f in files]
          + [("params", f.read_bytes()) for f in params])


def opcode_boundaries(data):
  try:
    return [position for _, _, position in pickletools.genops(data)]
  except ValueError:
    return [0, len(data)]


def mutate(rng, reader, data, others):
  kind = rng.choice(["truncate", "flip", "splice", "insert"])
  if kind == "truncate":
    return kind, data[:rng.randrange(len(data))]
  if kind == "flip":
    mutated = bytearray(data)
    for _ in range(rng.randint(1, 4)):
      mutated[rng.randrange(len(mutated))] ^= rng.randint(1, 255)
    return kind, bytes(mutated)
  cuts = opcode_boundaries(data) if reader == "states" else [
      rng.randrange(len(data)) for _ in range(8)]
  at = rng.choice(cuts)
  if kind == "insert":
    return kind, data[:at] + bytes([rng.randrange(256)]) + rng.randbytes(
        rng.randint(0, 8)) + data[at:]
  donor = rng.choice(others)
  donor_cuts = sorted(opcode_boundaries(donor) if reader == "states" else [
      rng.randrange(len(donor)) for _ in range(8)])
  i, j = sorted(rng.sample(donor_cuts, 2)) if len(donor_cuts) > 1 else (0, 0)
  end = rng.choice(cuts)
  return kind, data[:at] + donor[i:j] + data[max(at, end):]


def run_fuzz(seed, seconds):
  rng = random.Random(seed)
  corpus = fixtures()
  by_reader = {r: [d for k, d in corpus if k == r] for r in READERS}
  deadline = time.monotonic() + seconds
  results = []
  while time.monotonic() < deadline:
    reader, data = rng.choice(corpus)
    kind, mutated = mutate(rng, reader, data, by_reader[reader])
    results.append(run_one(kind, reader, mutated, measure=False))
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("mode", choices=["cases", "fuzz", "paths"])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--seconds", type=float, default=20.0)
  args = parser.parse_args()
  limit = limit_address_space()
  if args.mode == "cases":
    results, changed = run_cases()
  elif args.mode == "paths":
    results, changed = run_paths(), False
  else:
    results, changed = run_fuzz(args.seed, args.seconds), False
  for result in results:
    print(json.dumps(result))
  print(json.dumps({"address_space_limit": limit, "library_changed": changed}))
  bad = [r for r in results if r["outcome"] not in ("read", "FileError")]
  sys.exit(1 if bad or changed else 0)


if __name__ == "__main__":
  main()
