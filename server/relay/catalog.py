"""The models a user can pick right now: configured providers that have what they
need (a key), or the offline demo standing in for a default provider without one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from yarl import URL

from server.config import Config, ModelConfig, ProviderConfig

DEMO_MODELS = (
    ModelConfig(id="rill-demo", upstream_id="rill-demo", label="Demo (offline)", reasoning=False),
    ModelConfig(
        id="rill-demo-reasoner",
        upstream_id="rill-demo-reasoner",
        label="Demo reasoner (offline)",
        reasoning=True,
    ),
)


def demo_provider(base_url: URL) -> ProviderConfig:
    return ProviderConfig(
        name="demo",
        label="Rill demo (offline, not a real model)",
        base_url=base_url,
        api_key_env="",
        requires_key=False,
        models=DEMO_MODELS,
        demo=True,
    )


@dataclass(frozen=True, slots=True)
class Catalog:
    providers: tuple[ProviderConfig, ...]
    default_model: str
    demo: bool  # the default provider is the offline demo

    def resolve(self, model_id: str) -> tuple[ProviderConfig, ModelConfig] | None:
        for provider in self.providers:
            for model in provider.models:
                if model.id == model_id:
                    return provider, model
        return None

    def as_json(self) -> dict[str, Any]:
        return {
            "demo": self.demo,
            "default": self.default_model,
            "models": [
                {
                    "id": model.id,
                    "label": model.label,
                    "provider": provider.name,
                    "provider_label": provider.label,
                    "reasoning": model.reasoning,
                    "demo": provider.demo,
                }
                for provider in self.providers
                for model in provider.models
            ],
        }


def build_catalog(config: Config, demo_url: URL | None) -> Catalog:
    """Usable providers in config order; the demo replaces a default provider with no key."""
    default, *others = config.providers
    usable_others = tuple(p for p in others if p.usable)
    if default.usable or demo_url is None:
        providers = (default, *usable_others) if default.usable else usable_others
        catalog = Catalog(providers=providers, default_model=config.default_model, demo=False)
        if catalog.resolve(config.default_model) is None and providers:
            # default_model belongs to a provider without a key: fall back to one that works
            catalog = Catalog(providers, providers[0].models[0].id, demo=False)
        return catalog
    return Catalog(
        providers=(demo_provider(demo_url), *usable_others),
        default_model=DEMO_MODELS[0].id,
        demo=True,
    )
