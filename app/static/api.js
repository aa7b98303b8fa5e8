// Calls to the service's JSON API, with the API key the person typed. The key is kept in
// sessionStorage (this tab only, gone when it closes) and sent as a header: no cookies,
// so no other site can make the browser use it.

const KEY_STORAGE_NAME = "batch-image-service.api-key";
const KEY_REQUIRED = document.body.dataset.apiKeyRequired === "true";
const ASK_FOR_KEY = "This service needs an API key. Enter it to continue.";
const WRONG_KEY = "That API key was not accepted. Check it and enter it again.";
const PRINTABLE_KEY = /^[\x21-\x7e]+$/;

let keyAnswer = null; // the pending answer while the key form is shown

export function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE_NAME);
}

function askForKey(message) {
  if (keyAnswer) return keyAnswer;
  const form = document.getElementById("api-key-form");
  const input = document.getElementById("api-key");
  document.getElementById("api-key-message").textContent = message;
  form.hidden = false;
  input.focus();
  keyAnswer = new Promise((resolve) => {
    const onSubmit = (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!PRINTABLE_KEY.test(key)) {
        document.getElementById("api-key-message").textContent =
          "An API key has only letters, digits and punctuation, without spaces.";
        return;
      }
      form.removeEventListener("submit", onSubmit);
      sessionStorage.setItem(KEY_STORAGE_NAME, key);
      input.value = "";
      form.hidden = true;
      keyAnswer = null;
      resolve(key);
    };
    form.addEventListener("submit", onSubmit);
  });
  return keyAnswer;
}

// Ask at once when the service needs a key and none is kept, rather than on first use.
export async function ensureKey() {
  return storedKey() ?? (KEY_REQUIRED ? askForKey(ASK_FOR_KEY) : null);
}

export async function apiFetch(path, options = {}) {
  let key = await ensureKey();
  for (;;) {
    const headers = new Headers(options.headers);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...options, headers, credentials: "omit" });
    if (response.status !== 401) return response;
    if (key && storedKey() === key) sessionStorage.removeItem(KEY_STORAGE_NAME);
    key = storedKey() ?? (await askForKey(key ? WRONG_KEY : ASK_FOR_KEY));
  }
}

// The problem+json body of a failed answer, or a stand-in when it has none.
export async function readProblem(response) {
  try {
    const problem = await response.json();
    if (problem && typeof problem === "object") return problem;
  } catch {
    // not JSON: fall through
  }
  return { status: response.status, title: `The service answered ${response.status}.` };
}
