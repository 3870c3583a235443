// Model output rendered as Markdown, safely and incrementally.
//
// Safety: raw HTML in the text is shown as text, images become links (a remote image
// would load by itself and can leak the conversation through its URL), and every
// piece of HTML goes through DOMPurify into a DOM fragment before it reaches the page.
// Under the page's Trusted Types policy nothing else could write HTML anyway.
//
// Speed: the text is lexed into top-level blocks (the caller does this once per
// animation frame at most) and only blocks whose source changed are rebuilt (while
// streaming, usually just the last one), so long answers do not re-render,
// re-highlight or flicker.

import DOMPurify from "/static/vendor/purify.js";
import hljs from "/static/vendor/highlight.js";
import { Marked } from "/static/vendor/marked.js";
import { t } from "./i18n.js";

const LANGUAGE_NAME = /^[\w#+.-]{1,40}$/;
const MAX_HIGHLIGHT_CHARS = 200_000; // beyond this, plain code: highlighting would stall the page

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

// Off while a code block is still growing: highlighting all of it again every frame
// would cost more than a frame for long code. It is highlighted once it is complete.
let highlighting = true;

const markdown = new Marked({ gfm: true, breaks: true });
markdown.use({
  renderer: {
    html({ text }) {
      return escapeHtml(text);
    },
    checkbox({ checked }) {
      return checked ? "☑ " : "☐ "; // not <input>: forms and controls are not allowed in output
    },
    image({ href, text }) {
      const label = escapeHtml(text || href);
      return `<a href="${escapeHtml(href)}" class="image-link">🖼 ${label}</a>`;
    },
    code({ text, lang }) {
      const language = (lang || "").trim().split(/\s+/)[0];
      const known = LANGUAGE_NAME.test(language) && hljs.getLanguage(language) ? language : "";
      const body =
        known && highlighting && text.length <= MAX_HIGHLIGHT_CHARS
          ? hljs.highlight(text, { language: known, ignoreIllegals: true }).value
          : escapeHtml(text);
      const label = LANGUAGE_NAME.test(language) ? language : "";
      return `<pre data-language="${escapeHtml(label)}"><code class="hljs${known ? ` language-${known}` : ""}">${body}</code></pre>`;
    },
  },
});

const PURIFY_OPTIONS = {
  RETURN_DOM_FRAGMENT: true,
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "img", "svg", "math"],
  FORBID_ATTR: ["style", "id", "name"],
  ALLOW_DATA_ATTR: false,
  ADD_ATTR: ["data-language"],
};

const LINK_SCHEME = /^(https?:|mailto:)/i;

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName !== "A" || !node.hasAttribute("href")) return;
  // Only links out: a relative link from model output would point into Rill's own API.
  if (!LINK_SCHEME.test(node.getAttribute("href").trim())) {
    node.removeAttribute("href");
    return;
  }
  node.setAttribute("target", "_blank");
  node.setAttribute("rel", "noopener noreferrer nofollow");
});

function sanitize(html) {
  const fragment = DOMPurify.sanitize(html, PURIFY_OPTIONS);
  for (const pre of fragment.querySelectorAll("pre")) decorateCode(pre);
  return fragment;
}

function decorateCode(pre) {
  const bar = document.createElement("div");
  bar.className = "code-bar";
  const language = document.createElement("span");
  language.className = "code-language";
  language.textContent = pre.dataset.language || "";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "code-copy";
  copy.dataset.action = "copy-code";
  copy.dataset.i18n = "msg.copyCode";
  copy.textContent = t("msg.copyCode");
  bar.append(language, copy);
  pre.prepend(bar);
}

export class MarkdownView {
  constructor(element) {
    this.element = element;
    this.blocks = []; // {raw, node, plain} per top-level block, in order
    this.text = null;
    this.live = false;
    this.links = "{}"; // the reference definitions the blocks were drawn with
  }

  /** Shows text; live: more is coming. The caller throttles this to animation frames. */
  render(text, live = false) {
    if (text === this.text && live === this.live) return;
    this.text = text;
    this.live = live;
    const all = markdown.lexer(text);
    const tokens = all.filter((token) => token.type !== "space" && token.type !== "def");
    // A reference definition ([1]: https://...) can come after its use: redo every block then.
    const links = JSON.stringify(all.links);
    const relink = links !== this.links;
    this.links = links;
    tokens.forEach((token, index) => {
      const plain = live && index === tokens.length - 1 && token.type === "code";
      const block = this.blocks[index];
      if (relink || !block || block.raw !== token.raw || block.plain !== plain) {
        this._replace(index, token, all.links, plain);
      }
    });
    for (const block of this.blocks.splice(tokens.length)) block.node.remove();
  }

  _replace(index, token, links, plain) {
    const list = [token];
    list.links = links;
    const node = document.createElement("div");
    node.className = "md-block";
    highlighting = !plain;
    try {
      node.append(sanitize(markdown.parser(list)));
    } finally {
      highlighting = true;
    }
    const old = this.blocks[index];
    if (old) old.node.replaceWith(node);
    else this.element.append(node);
    this.blocks[index] = { raw: token.raw, node, plain };
  }
}
