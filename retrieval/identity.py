"""Which CLIP made an index's embeddings: a query must come from the same one."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from prior.factory import state_sha256


class ClipIdentity(BaseModel):
    """The weights' name, the sha256 of CLIP's own tensors (``prior.factory.state_sha256``; the
    prior is left out, since it does not touch image embeddings) and the embedding width."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    sha256: str
    dim: int

    def mismatch(self, other: ClipIdentity) -> str | None:
        """Why embeddings of ``other`` cannot be searched among this CLIP's, or ``None``."""
        if self.sha256 == other.sha256 and self.dim == other.dim:
            return None
        return (
            f"the index was built with CLIP {self.name!r} (sha256 {self.sha256[:12]}, {self.dim} wide), "
            f"this query's is {other.name!r} (sha256 {other.sha256[:12]}, {other.dim} wide); "
            "query with the weights the index was built with, or build it again with didp index --weights"
        )


def clip_identity(models) -> ClipIdentity:
    """The identity of ``models.clip`` (a ``prior.factory.Models``)."""
    return ClipIdentity(
        name=models.identity.name,
        sha256=state_sha256({"": models.clip.state_dict()}),
        dim=int(models.clip.embed_dim),
    )
