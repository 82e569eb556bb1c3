import { docsToken } from "./docs-token.js";

const response = await fetch("/openapi.json", {
  headers: { Authorization: `token ${docsToken()}` },
});
const target = document.getElementById("redoc");
if (response.ok) {
  window.Redoc.init(await response.json(), {}, target);
} else {
  target.textContent = `The schema could not be read: ${response.status} ${response.statusText}`;
}
