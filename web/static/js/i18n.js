// Interface text in English and Simplified Chinese. Strings are only ever set with
// textContent or attributes, so they are never parsed as HTML.

const MESSAGES = {
  en: {
    "app.newChat": "New chat",
    "app.conversations": "Conversations",
    "app.noConversations": "No conversations yet.",
    "app.untitled": "New chat",
    "app.menu": "Conversations",
    "app.rename": "Rename",
    "app.delete": "Delete",
    "app.confirmDelete": "Delete?",
    "app.export": "Export as Markdown",
    "app.systemPrompt": "System prompt",
    "app.systemPromptHint": "Instructions the model follows in this conversation (optional)",
    "app.model": "Model",
    "app.demoSuffix": "demo",
    "app.loadingModels": "Loading models…",
    "app.modelsFailed": "Could not load the model list",
    "app.theme": "Theme",
    "app.theme.system": "Theme: system",
    "app.theme.light": "Theme: light",
    "app.theme.dark": "Theme: dark",
    "app.language": "Language",
    "app.language.auto": "Auto",
    "app.demoBanner":
      "Demo mode: no API key is set, so answers come from Rill's built-in offline demo, not from a real model.",
    "app.empty": "Ask anything. Answers stream in as the model writes them.",
    "app.placeholder": "Message Rill (Enter to send, Shift+Enter for a new line)",
    "app.send": "Send",
    "app.stop": "Stop",
    "app.jumpToBottom": "Jump to the latest",
    "app.storageFull": "Browser storage is full; delete some conversations to keep new ones.",
    "msg.you": "You",
    "msg.assistant": "Assistant",
    "msg.thinking": "Thinking",
    "msg.thoughtFor": "Thought for {seconds} s",
    "msg.copy": "Copy",
    "msg.copied": "Copied",
    "msg.copyCode": "Copy code",
    "msg.edit": "Edit",
    "msg.saveAndSend": "Save & send",
    "msg.cancel": "Cancel",
    "msg.regenerate": "Regenerate",
    "msg.continue": "Continue",
    "msg.retry": "Retry",
    "msg.waiting": "Waiting for the model…",
    "msg.reconnecting": "Connection lost; reconnecting…",
    "msg.stopped": "Stopped",
    "msg.stopping": "Stopping…",
    "msg.truncated": "The answer reached its length limit.",
    "msg.filtered": "The provider withheld the rest of this answer (content filter).",
    "msg.demoAnswer": "Demo answer",
    "msg.stats.tokensPerSecond": "{rate} tokens/s",
    "msg.stats.elapsed": "{seconds} s",
    "msg.stats.usage": "{prompt} in · {completion} out",
    "msg.stats.estimated": "≈{count} tokens",
    "err.network": "Could not reach the Rill server. Check your connection and try again.",
    "err.signedOut": "You are signed out of this Rill. Sign in, then try again.",
    "auth.title": "Sign in to Rill",
    "auth.hint": "This Rill is private. Enter the access token its owner gave you.",
    "auth.token": "Access token",
    "auth.signIn": "Sign in",
    "auth.signOut": "Sign out",
    "auth.badToken": "That access token is not valid.",
    "auth.tooMany": "Too many wrong tokens. Try again in {seconds} s.",
    "auth.failed": "Could not sign in. Check your connection and try again.",
    "err.expired": "This answer is no longer available on the server (answers are kept for a few minutes).",
    "err.unexpected": "Something went wrong: {detail}",
    "err.lost": "The connection to the answer was lost.",
    "err.badResponse": "The server sent a response this page does not understand.",
    "continue.prompt": "Continue exactly where your previous answer stopped. Do not repeat anything you already wrote.",
  },
  "zh-CN": {
    "app.newChat": "新对话",
    "app.conversations": "对话",
    "app.noConversations": "还没有对话。",
    "app.untitled": "新对话",
    "app.menu": "对话列表",
    "app.rename": "重命名",
    "app.delete": "删除",
    "app.confirmDelete": "确定删除？",
    "app.export": "导出为 Markdown",
    "app.systemPrompt": "系统提示词",
    "app.systemPromptHint": "模型在本对话中遵循的指令（可选）",
    "app.model": "模型",
    "app.demoSuffix": "演示",
    "app.loadingModels": "正在加载模型…",
    "app.modelsFailed": "无法加载模型列表",
    "app.theme": "主题",
    "app.theme.system": "主题：跟随系统",
    "app.theme.light": "主题：浅色",
    "app.theme.dark": "主题：深色",
    "app.language": "语言",
    "app.language.auto": "自动",
    "app.demoBanner": "演示模式：未设置 API 密钥，回答来自 Rill 内置的离线演示，而不是真实模型。",
    "app.empty": "随便问点什么。模型一边写，回答一边显示。",
    "app.placeholder": "给 Rill 发消息（Enter 发送，Shift+Enter 换行）",
    "app.send": "发送",
    "app.stop": "停止",
    "app.jumpToBottom": "跳到最新",
    "app.storageFull": "浏览器存储已满；请删除一些对话以保存新的对话。",
    "msg.you": "你",
    "msg.assistant": "助手",
    "msg.thinking": "思考中",
    "msg.thoughtFor": "思考了 {seconds} 秒",
    "msg.copy": "复制",
    "msg.copied": "已复制",
    "msg.copyCode": "复制代码",
    "msg.edit": "编辑",
    "msg.saveAndSend": "保存并发送",
    "msg.cancel": "取消",
    "msg.regenerate": "重新生成",
    "msg.continue": "继续",
    "msg.retry": "重试",
    "msg.waiting": "等待模型回复…",
    "msg.reconnecting": "连接中断，正在重连…",
    "msg.stopped": "已停止",
    "msg.stopping": "正在停止…",
    "msg.truncated": "回答已达到长度上限。",
    "msg.filtered": "服务商拦截了回答的其余部分（内容过滤）。",
    "msg.demoAnswer": "演示回答",
    "msg.stats.tokensPerSecond": "{rate} 词元/秒",
    "msg.stats.elapsed": "{seconds} 秒",
    "msg.stats.usage": "输入 {prompt} · 输出 {completion}",
    "msg.stats.estimated": "约 {count} 词元",
    "err.network": "无法连接到 Rill 服务器。请检查网络后重试。",
    "err.signedOut": "你已退出此 Rill。请登录后重试。",
    "auth.title": "登录 Rill",
    "auth.hint": "这是私有的 Rill。请输入管理员给你的访问令牌。",
    "auth.token": "访问令牌",
    "auth.signIn": "登录",
    "auth.signOut": "退出登录",
    "auth.badToken": "访问令牌无效。",
    "auth.tooMany": "错误次数过多。请 {seconds} 秒后再试。",
    "auth.failed": "无法登录。请检查网络后重试。",
    "err.expired": "服务器上已没有这条回答（回答只保留几分钟）。",
    "err.unexpected": "出错了：{detail}",
    "err.lost": "与回答的连接已断开。",
    "err.badResponse": "服务器返回了本页面无法识别的响应。",
    "continue.prompt": "请从你上一条回答停下的地方继续，不要重复已经写过的内容。",
  },
};

export const LANGUAGES = Object.freeze(["en", "zh-CN"]);

let current = "en";

/** The language to use: the saved choice, else the first supported browser language. */
export function detectLanguage(saved, browserLanguages) {
  if (LANGUAGES.includes(saved)) return saved;
  for (const tag of browserLanguages) {
    const lower = String(tag).toLowerCase();
    if (lower.startsWith("zh")) return "zh-CN";
    if (lower.startsWith("en")) return "en";
  }
  return "en";
}

export function setLanguage(language) {
  current = LANGUAGES.includes(language) ? language : "en";
  document.documentElement.lang = current;
}

/** The text for key, with {name} placeholders filled in from params. */
export function t(key, params = {}) {
  const template = MESSAGES[current][key] ?? MESSAGES.en[key] ?? key;
  return template.replace(/\{(\w+)\}/g, (match, name) => (name in params ? String(params[name]) : match));
}

/** Fills the static parts of the page: data-i18n (text), data-i18n-title, -placeholder, -label. */
export function translatePage(root = document) {
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
  for (const el of root.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of root.querySelectorAll("[data-i18n-label]")) el.setAttribute("aria-label", t(el.dataset.i18nLabel));
}
