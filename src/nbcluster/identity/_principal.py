"""Who a request comes from: a :class:`Principal`, made by an authenticator from the token the
request carries, read by the gateway's access checks."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["Principal", "Role"]

#: ``admin``: an operator, sees and may do everything. ``user``: a person, sees and touches
#: only what they own. ``kernel``: the scoped token a kernel's replicas hold, for its %%job
#: magics, on behalf of the kernel's owner. ``host``: a host daemon holding the join token.
Role = Literal["admin", "user", "kernel", "host"]


class Principal(BaseModel):
    """An authenticated caller. ``user`` is the name whose kernels and jobs it may touch (for
    a kernel token, the kernel's owner; for a host, empty)."""

    model_config = ConfigDict(frozen=True)

    role: Role
    user: str = ""
    #: The kernel a ``kernel`` principal speaks for.
    kernel_id: str = ""

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def owns(self, owner: str) -> bool:
        """Whether what ``owner`` owns is this principal's to see and touch."""
        return self.is_admin or (
            self.role in ("user", "kernel") and bool(owner) and owner == self.user
        )

    def describe(self) -> str:
        """For error messages and logs (never the token)."""
        if self.role == "kernel":
            return f"kernel {self.kernel_id} of user {self.user!r}"
        if self.role == "host":
            return "a host daemon"
        return f"{self.role} {self.user!r}"
