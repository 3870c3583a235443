// Light, dark, or the system's choice (prefers-color-scheme). The highlight.js
// stylesheets follow the same choice through their media attributes.

import { t } from "./i18n.js";

export const THEMES = Object.freeze(["system", "light", "dark"]);

export function applyTheme(theme) {
  const root = document.documentElement;
  if (theme === "light" || theme === "dark") root.dataset.theme = theme;
  else delete root.dataset.theme;
  const light = document.getElementById("hl-light");
  const dark = document.getElementById("hl-dark");
  light.media = theme === "system" ? "(prefers-color-scheme: light)" : theme === "light" ? "all" : "not all";
  dark.media = theme === "system" ? "(prefers-color-scheme: dark)" : theme === "dark" ? "all" : "not all";
}

export function nextTheme(theme) {
  return THEMES[(THEMES.indexOf(theme) + 1) % THEMES.length];
}

export function themeLabel(theme) {
  return t(`app.theme.${THEMES.includes(theme) ? theme : "system"}`);
}
