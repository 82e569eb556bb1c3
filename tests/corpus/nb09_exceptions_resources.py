# Failover corpus: kept exceptions with tracebacks; objects that may be announced as not
# surviving (generators, locks, files, weakrefs, contextvars, re matches) and iterators.

# %% kept exception with its __traceback__ + chained exception + custom exception class
def parse(v):
    return int(v)

try:
    parse("x")
except ValueError as exc:
    err = exc

class AppError(Exception):
    def __init__(self, code):
        super().__init__(f"code {code}")
        self.code = code

try:
    try:
        {}["missing"]
    except KeyError as inner:
        raise AppError(7) from inner
except AppError as exc:
    chained = exc
print(type(err).__name__, err.__traceback__ is not None)

# %% kept exception (check): its traceback and chain
import traceback
print(err, [(f.name, f.line) for f in traceback.extract_tb(err.__traceback__)])
print(chained.code, repr(chained.__cause__), chained.__traceback__ is not None)

# %% generator in progress + generator expression
def countdown(n):
    while n > 0:
        yield n
        n -= 1

cd = countdown(5)
squares = (i * i for i in range(10))
print(next(cd), next(cd), next(squares))

# %% generators (check)
print(next(cd), list(squares)[:3])

# %% lock + file handle
import threading
lock = threading.Lock()
rlock = threading.RLock()
fh = open("corpus_data.txt", "w")
fh.write("hello\n")
print(lock.locked())

# %% lock (check) + file (check)
with lock:
    print("locked inside:", lock.locked())
fh.write("more\n")
fh.close()
print(open("corpus_data.txt").read().split())

# %% weakref + contextvar + re pattern and match
import contextvars
import re
import weakref

class Thing:
    pass

strong = Thing()
wref = weakref.ref(strong)
cvar = contextvars.ContextVar("cvar", default=0)
cvar.set(5)
pat = re.compile(r"(\d+)-(\w+)")
m = pat.search("id 12-ab")
print(wref() is strong, cvar.get(), m.groups())

# %% weakref (check) + contextvar (check) + re (check)
print(wref() is strong, cvar.get(), pat.pattern, m.group(2), m.span())

# %% iterators in progress (list iterator, itertools.count, enumerate, zip)
import itertools
it = iter([10, 20, 30, 40])
next(it)
ticker = itertools.count(100, 5)
next(ticker)
pairs = zip("abc", range(3))
next(pairs)
print(next(it), next(ticker))

# %% iterators (check)
print(list(it), next(ticker), list(pairs))
