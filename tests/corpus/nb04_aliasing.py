# Failover corpus: two names for one object must stay one object on every replica.
# requires: numpy

# %% alias of a list (b = a) + element alias + alias of a function + numpy array and its view
import numpy as np
a = [1, 2]
b = a
rows = [[0, 0, 0] for _ in range(2)]
first = rows[0]
def f():
    return "f"
g = f
arr = np.arange(10.0)
view = arr[2:5]
print(a, b, rows, view, view.base is arr)

# %% list alias, element alias, function alias (check) + array view (check)
a.append(3)
first[0] = 7
print(b, rows, b is a, first is rows[0], g is f)
arr[3] = 99.0
view[0] = -1.0
print(arr[:6], view, np.shares_memory(arr, view))

# %% bound method kept in a variable + two closures sharing a cell
class Accumulator:
    def __init__(self):
        self.total = 0

    def add(self, v):
        self.total += v
        return self.total

def make_pair():
    n = 0
    def inc():
        nonlocal n
        n += 1
        return n
    def get():
        return n
    return inc, get

acc = Accumulator()
add_to = acc.add
push = a.append
inc, get = make_pair()
inc()
print(add_to(1), get())

# %% bound method (check) + shared closure cell (check)
add_to(5)
push(4)
print(acc.total, a, b, add_to.__self__ is acc)
inc()
inc()
print(get(), inc.__closure__[0] is get.__closure__[0])

# %% sentinel object compared with "is" + cycles + one object in two containers
SENTINEL = object()
config = {"opt": SENTINEL, "other": 1}
def is_unset(v):
    return v is SENTINEL
cyc = []
cyc.append(cyc)
holder = {"me": None}
holder["me"] = holder
shared = {"hits": 0}
left, right = [shared], {"s": shared}
print(is_unset(config["opt"]), len(cyc), list(holder))

# %% sentinel (check) + cycles (check) + shared object in two containers (check)
print(config["opt"] is SENTINEL, is_unset(config["opt"]), is_unset(config["other"]))
left[0]["hits"] += 1
print(cyc[0] is cyc, holder["me"] is holder, right["s"]["hits"], right["s"] is left[0])

# %% an object created later that refers to objects synchronised earlier
late = {"ref": a, "acc": acc}
late["ref"].append(5)
print(a, late["ref"] is a)

# %% later reference (check)
a.append(6)
print(late["ref"], late["acc"] is acc, b)
