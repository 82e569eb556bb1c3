# Failover corpus: dataclasses, enums, ABC hierarchies, metaclasses, class factories, classes
# used as dict keys, properties and class/static methods.

# %% dataclasses (mutable with default_factory, frozen and ordered)
import dataclasses
from dataclasses import dataclass, field

@dataclass
class Item:
    name: str
    qty: int = 0
    tags: list = field(default_factory=list)

@dataclass(frozen=True, order=True)
class Version:
    major: int
    minor: int = 0

items = [Item("a", 1), Item("b", 2, ["x"])]
versions = sorted([Version(1, 2), Version(1, 0), Version(0, 9)])
print(items, versions[0])

# %% dataclasses (check)
items[0].tags.append("new")
print(items, dataclasses.asdict(items[1]), versions, Version(1, 0) in versions)
print([f.name for f in dataclasses.fields(Item)], hash(Version(2)) == hash(Version(2)))

# %% enums (Enum, IntFlag, auto) kept in variables and containers
import enum

class Color(enum.Enum):
    RED = 1
    GREEN = 2

class Perm(enum.IntFlag):
    R = 4
    W = 2
    X = 1

class Stage(enum.Enum):
    START = enum.auto()
    END = enum.auto()

fav = Color.GREEN
perm = Perm.R | Perm.W
palette = {Color.RED: "#f00", Color.GREEN: "#0f0"}
print(fav, perm, Stage.END.value)

# %% enums (check)
print(fav is Color.GREEN, Color(2) is fav, palette[fav], list(Color), Perm.W in perm)
print(Stage["START"], [s.name for s in Stage])

# %% ABC class hierarchy + metaclass registry + __init_subclass__ registry
from abc import ABC, abstractmethod

class Shape(ABC):
    @abstractmethod
    def area(self): ...

class Square(Shape):
    def __init__(self, s):
        self.s = s

    def area(self):
        return self.s**2

class Rect(Square):
    def __init__(self, w, h):
        super().__init__(w)
        self.h = h

    def area(self):
        return self.s * self.h

class Registry(type):
    classes = []

    def __new__(mcs, name, bases, ns):
        cls = super().__new__(mcs, name, bases, ns)
        mcs.classes.append(name)
        return cls

class PluginA(metaclass=Registry):
    pass

class Base:
    subclasses = []

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        Base.subclasses.append(cls)

class ChildA(Base):
    pass

shapes = [Square(2), Rect(2, 3)]
print([s.area() for s in shapes], Registry.classes, Base.subclasses)

# %% hierarchies (check)
class PluginB(metaclass=Registry):
    pass

class ChildB(Base):
    pass

print([s.area() for s in shapes], isinstance(shapes[1], Shape), [c.__name__ for c in Rect.__mro__])
print(Registry.classes, [c.__name__ for c in Base.subclasses], ChildA in Base.subclasses)

# %% class factory (classes made by a function) + objects as dict keys
def make_unit(symbol):
    class Unit:
        sym = symbol

        def __init__(self, v):
            self.v = v

        def __repr__(self):
            return f"{self.v}{self.sym}"
    return Unit

Meter = make_unit("m")
dist = Meter(5)

class Key:
    def __init__(self, k):
        self.k = k

    def __eq__(self, other):
        return isinstance(other, Key) and other.k == self.k

    def __hash__(self):
        return hash(("Key", self.k))

lookup = {Key(1): "one", Key(2): "two"}
print(dist, type(dist).__qualname__, lookup[Key(2)])

# %% class factory (check) + dict keys (check)
print(dist, isinstance(dist, Meter), Meter(3), lookup[Key(1)], len(lookup))

# %% properties, class methods, static methods, class-level counters
class Temperature:
    created = 0

    def __init__(self, c):
        self._c = c
        Temperature.created += 1

    @property
    def f(self):
        return self._c * 9 / 5 + 32

    @f.setter
    def f(self, value):
        self._c = (value - 32) * 5 / 9

    @classmethod
    def freezing(cls):
        return cls(0)

    @staticmethod
    def describe():
        return "temperature"

temp = Temperature.freezing()
temp.f = 212
print(temp.f, Temperature.created)

# %% properties and class methods (check)
print(temp.f, temp._c, Temperature.freezing().f, Temperature.describe(), Temperature.created)
