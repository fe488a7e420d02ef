// Tenant pages: ask before destructive posts (forms with data-confirm), and copy buttons
// (data-copy="#input") for a new key's secret or an invite link. Without script the forms
// still post and the text can be selected and copied by hand.
"use strict";

document.addEventListener("submit", (event) => {
  const form = event.target;
  const question = form instanceof HTMLFormElement ? form.dataset.confirm : undefined;
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

document.addEventListener("click", async (event) => {
  const button = event.target instanceof Element ? event.target.closest("[data-copy]") : null;
  if (!button) {
    return;
  }
  const source = document.querySelector(button.dataset.copy);
  const status = button.parentElement.querySelector(".copy-status");
  if (!source) {
    return;
  }
  source.select();
  let copied = false;
  try {
    await navigator.clipboard.writeText(source.value);
    copied = true;
  } catch {
    copied = document.execCommand("copy");
  }
  if (status) {
    status.textContent = copied ? "Copied" : "Selected: press Ctrl+C (or ⌘C) to copy";
  }
});
