"""Who may see and touch which kernel, kernelspec and job, and the per-user quotas: the checks
the API handlers make once the auth middleware has said who is calling.

What a user does not own answers as if it did not exist (404, the same message as for an
unknown id), so ids cannot be probed; admins see everything. Kept apart from the handlers so
that the rules are in one place and the routers stay thin."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..identity import Principal, QuotaExceeded, check_gpus, check_kernels, spec_allowed
from ..jobs import Job, JobSpec, input_key_allowed
from ..scheduling import DEFAULT_REQUEST, parse_request
from ._config import GatewayConfig
from ._errors import ApiError, NoSuchJob, NoSuchKernel
from ._identity import GatewayIdentity
from ._jobs import JobManager
from ._kernel import GatewayKernel
from ._kernelspecs import DEFAULT_KERNEL_NAME, KernelSpecRegistry
from ._manager import KernelManager

__all__ = ["Access"]


def _quota_error(exc: QuotaExceeded) -> ApiError:
    return ApiError(exc.status, str(exc), "quota exceeded")


class Access:
    """Built by the gateway over its kernels, kernelspecs, jobs and identities."""

    def __init__(
        self,
        config: GatewayConfig,
        identity: GatewayIdentity,
        kernels: KernelManager,
        specs: KernelSpecRegistry,
        jobs: JobManager,
    ) -> None:
        self._config = config
        self._identity = identity
        self._kernels = kernels
        self._specs = specs
        self._jobs = jobs

    # -- kernels ------------------------------------------------------------------------------

    def kernel(self, principal: Principal, kernel_id: str) -> GatewayKernel:
        """The kernel if ``principal`` may touch it, else ``NoSuchKernel`` (404)."""
        kernel = self._kernels.get(kernel_id)
        if principal.role == "kernel" or not principal.owns(kernel.record.owner):
            raise NoSuchKernel(f"no kernel with id {kernel_id}")
        return kernel

    def kernels(self, principal: Principal) -> list[GatewayKernel]:
        return [k for k in self._kernels.kernels.values() if principal.owns(k.record.owner)]

    def _running_kernels(self, user: str) -> int:
        return sum(
            1 for k in self._kernels.kernels.values() if k.record.owner == user and not k.is_dead
        )

    def admit_kernel(self, principal: Principal, name: str | None, env: Mapping[str, Any]) -> str:
        """Check that ``principal`` may start a kernel of kernelspec ``name`` with ``env``
        (kernelspec access, quotas); returns the owner to record. Unknown specs and bad
        values are left to the kernel manager, which names them."""
        user = principal.user
        spec_name = name or DEFAULT_KERNEL_NAME
        spec = self._specs.get(spec_name)
        if spec is not None:
            why = spec_allowed(user, spec_name, spec.metadata, self._config.unauthorized_users)
            if why is not None:
                raise ApiError(403, why, "forbidden")
        quotas = self._identity.quotas_of(user)
        try:
            check_kernels(user, quotas, self._running_kernels(user))
            try:
                gpus = int(parse_request({k: str(v) for k, v in env.items()}, DEFAULT_REQUEST).gpus)
            except (ValueError, TypeError):
                gpus = 0  # the kernel manager refuses it with the reason
            # A kernel's GPUs are committed only while its cells run: its request must fit
            # the quota, what it holds at a time is counted with the user's jobs.
            check_gpus(user, quotas, 0, gpus, "the kernel")
        except QuotaExceeded as exc:
            raise _quota_error(exc) from None
        return user

    # -- kernelspecs --------------------------------------------------------------------------

    def spec_names(self, principal: Principal) -> list[str]:
        """The kernelspecs ``principal`` may start (admins: all; the others are hidden from
        users, so JupyterLab offers only what works)."""
        return [n for n in self._specs.names if self._may_use_spec(principal, n)]

    def _may_use_spec(self, principal: Principal, name: str) -> bool:
        spec = self._specs.get(name)
        if spec is None:
            return False
        if principal.is_admin:
            return True
        return (
            spec_allowed(principal.user, name, spec.metadata, self._config.unauthorized_users)
            is None
        )

    def spec(self, principal: Principal, name: str) -> None:
        if not self._may_use_spec(principal, name):
            raise ApiError(404, f"no kernelspec named {name!r}", "kernelspec not found")

    # -- jobs ---------------------------------------------------------------------------------

    def job(self, principal: Principal, job_id: str) -> Job:
        """The job if ``principal`` may see it (a kernel: only the jobs it submitted)."""
        job = self._jobs.get(job_id)
        if not self._sees_job(principal, job):
            raise NoSuchJob(f"no job with id {job_id}")
        return job

    @staticmethod
    def _sees_job(principal: Principal, job: Job) -> bool:
        if principal.role == "kernel":
            return job.spec.kernel_id == principal.kernel_id and job.spec.owner == principal.user
        return principal.owns(job.spec.owner)

    def jobs(self, principal: Principal, found: Iterable[Job]) -> list[Job]:
        return [j for j in found if self._sees_job(principal, j)]

    def admit_job(self, principal: Principal, spec: JobSpec) -> JobSpec:
        """The spec as it is queued: owned by the caller (an admin may name another owner),
        tagged with the submitting kernel, within the owner's GPU quota."""
        owner = spec.owner if principal.is_admin and spec.owner else principal.user
        spec = spec.model_copy(update={"owner": owner, "kernel_id": principal.kernel_id})
        if not principal.is_admin:
            owned = {j.id for j in self._jobs.list_jobs(owner=owner)}
            for name, key in spec.inputs.items():
                if not input_key_allowed(key, owner, owned):
                    raise ApiError(
                        403,
                        f"inputs.{name}: a job may read only its owner's uploads "
                        f"(POST /api/jobs/inputs) and its owner's jobs' outputs, not {key!r}",
                        "forbidden",
                    )
        try:
            check_gpus(
                owner,
                self._identity.quotas_of(owner),
                self.committed_gpus(owner),
                spec.resources.gpus * spec.workers,
                "the job",
            )
        except QuotaExceeded as exc:
            raise _quota_error(exc) from None
        return spec

    def committed_gpus(self, user: str) -> int:
        """GPUs ``user``'s cells hold now, and their jobs queued or running (a queued job
        counts: the quota bounds the GPU work a user has in the cluster, so nobody fills the
        GPU queue past it)."""
        held = 0
        for kernel in self._kernels.kernels.values():
            if kernel.record.owner != user:
                continue
            view = self._kernels.scheduling.kernel_view(kernel.id)
            if view is not None and view.binding is not None:
                held += len(view.binding.device_indices)
        for job in self._jobs.list_jobs(owner=user):
            if job.status in ("queued", "running"):
                held += job.spec.resources.gpus * job.spec.workers
        return held
