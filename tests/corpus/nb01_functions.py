# Failover corpus: decorated functions, caches, dispatch, closures, source of functions.
# Each "# %%" line starts a cell; the text after it names the pattern(s) the cell belongs to.

# %% lru_cache (plain) + functools.cache (plain)
import functools

@functools.lru_cache(maxsize=None)
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)

@functools.cache
def square(x):
    return x * x

print(fib(30), square(12))

# %% lru_cache and cache as methods
class Stats:
    def __init__(self, values):
        self.values = tuple(values)

    def __hash__(self):
        return hash(self.values)

    def __eq__(self, other):
        return isinstance(other, Stats) and self.values == other.values

    @functools.lru_cache(maxsize=16)
    def mean(self):
        return sum(self.values) / len(self.values)

    @functools.cache
    def spread(self):
        return max(self.values) - min(self.values)

st = Stats([1, 2, 3, 10])
print(st.mean(), st.spread())

# %% lru_cache (check) + cache (check) + cache methods (check)
print(fib(80), square(13), st.mean(), st.spread(), Stats([4, 6]).mean())
print(fib.cache_info().currsize, square.cache_info().currsize)

# %% singledispatch
@functools.singledispatch
def describe(x):
    return f"thing {x!r}"

@describe.register(int)
def _(x):
    return f"int {x}"

@describe.register
def _(x: list):
    return f"list of {len(x)}"

print(describe(1), describe([1, 2]), describe("s"))

# %% cached_property class + functools.partial + user decorator with functools.wraps
class Circle:
    def __init__(self, r):
        self.r = r

    @functools.cached_property
    def area(self):
        print("computing area")
        return round(3.14159 * self.r**2, 3)

circle = Circle(2)
print(circle.area)
pow2 = functools.partial(pow, 2)
calls = []

def logged(f):
    @functools.wraps(f)
    def inner(*args):
        calls.append(f.__name__)
        return f(*args)
    return inner

@logged
def add(a, b):
    return a + b

print(add(1, 2), pow2(10))

# %% singledispatch (check) + cached_property (check) + partial/wraps (check)
print(describe(2.5), describe(3), describe([0]))
print(circle.area, "area" in vars(circle), Circle(1).area)
print(pow2(3), add(2, 3), calls, add.__wrapped__.__name__)

# %% closure with nonlocal state + lambda in a container
def make_counter(start=0):
    count = start
    def step(by=1):
        nonlocal count
        count += by
        return count
    return step

counter = make_counter(10)
counter()
ops = {"double": lambda v: 2 * v, "neg": lambda v: -v}
print(counter(), ops["double"](21))

# %% closure (check) + lambdas (check)
print(counter(), counter(5), ops["neg"](ops["double"](4)))

# %% inspect.getsource of earlier functions + traceback through an earlier function
import inspect

def boom(d):
    return 1 / d

print(inspect.getsource(boom))

# %% source kept (check): getsource and the traceback's source line after failovers
print(inspect.getsource(make_counter).splitlines()[0])
print(inspect.getsource(add.__wrapped__).splitlines()[-1])
boom(0)

# %% recursion + globals read by a function defined earlier + function attributes
LIMIT = 3
def under_limit(v):
    return v < LIMIT
under_limit.checked = 0
print([under_limit(v) for v in range(5)])

# %% globals read later (check) + function attributes (check)
LIMIT = 4
under_limit.checked += 1
print([under_limit(v) for v in range(5)], under_limit.checked)
