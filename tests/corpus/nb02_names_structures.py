# Failover corpus: names starting with "_", deep structures, __slots__, typing, nested classes.

# %% user variables starting with "_"
_private = {"token": "abc", "n": 1}
_cache_ = [1, 2, 3]
__almost_dunder = "two leading underscores"
_helper = lambda v: v + 1
print(len(_private), _cache_[-1])

# %% "_" variables (check)
_private["n"] += 1
print(_private, _cache_, __almost_dunder, _helper(1))

# %% linked list 5,000 deep + nested list 3,000 deep
class Node:
    def __init__(self, value, next=None):
        self.value = value
        self.next = next

head = None
for i in range(5000):
    head = Node(i, head)
nested = []
for i in range(3000):
    nested = [nested]

def length(node):
    n = 0
    while node is not None:
        n, node = n + 1, node.next
    return n

print(length(head), head.value)

# %% deep structures (check)
depth, cur = 0, nested
while cur:
    depth, cur = depth + 1, cur[0]
print(length(head), head.value, head.next.next.value, depth)

# %% classes with __slots__ (and slots inherited)
class Point:
    __slots__ = ("x", "y")

    def __init__(self, x, y):
        self.x, self.y = x, y

class Point3(Point):
    __slots__ = ("z",)

    def __init__(self, x, y, z):
        super().__init__(x, y)
        self.z = z

class Mixed:
    __slots__ = ("a", "__dict__")

pt, p3, mixed = Point(1, 2), Point3(3, 4, 5), Mixed()
mixed.a, mixed.extra = "slot", "dict"
print(pt.x, p3.z, mixed.a)

# %% __slots__ (check)
pt.x += 10
print(pt.x, pt.y, p3.x, p3.y, p3.z, mixed.a, mixed.extra)

# %% typing generics, TypeVar, NewType, NamedTuple, TypedDict, aliases
from typing import Generic, NamedTuple, NewType, TypedDict, TypeVar

T = TypeVar("T")
K = TypeVar("K", bound=str)

class Box(Generic[T]):
    def __init__(self, item: T):
        self.item = item

UserId = NewType("UserId", int)

class Pair(NamedTuple):
    left: int
    right: str = "r"

class Movie(TypedDict):
    title: str
    year: int

box = Box[int](3)
uid = UserId(42)
pair = Pair(1)
movie: Movie = {"title": "Up", "year": 2009}
Table = dict[str, list[int]]
print(Box[int], UserId, uid, pair, Table)

# %% typing (check)
print(box.item, Box.__parameters__, T, K.__bound__, UserId(7), UserId.__supertype__)
print(pair._asdict(), Pair._fields, Movie.__annotations__, movie, Table)

# %% nested classes + class hierarchy with class-level state and super()
class Outer:
    class Inner:
        def __init__(self, v):
            self.v = v

        def __repr__(self):
            return f"Inner({self.v})"

    def __init__(self):
        self.inner = Outer.Inner(5)

class Animal:
    count = 0

    def __init__(self, name):
        Animal.count += 1
        self.name = name

    def speak(self):
        return f"{self.name} makes a sound"

class Dog(Animal):
    def speak(self):
        return super().speak().replace("a sound", "woof")

outer = Outer()
dogs = [Dog("rex"), Dog("fido"), Animal("generic")]
print(outer.inner, type(outer.inner).__qualname__, Animal.count)

# %% nested classes (check) + hierarchy (check)
print(outer.inner, Outer.Inner(6), [d.speak() for d in dogs])
print(Animal.count, isinstance(dogs[0], Animal), [c.__name__ for c in Dog.__mro__])
Dog("late")
print(Animal.count)
