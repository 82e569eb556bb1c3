// The token the API docs fetch the schema (and try requests) with: the dashboard's, if this
// tab logged in there, else asked for once (kept in this tab only).
import { saveToken, savedToken } from "./api.js";

export function docsToken() {
  let token = savedToken();
  if (!token) {
    token = (window.prompt("Token for the nbcluster API (admin or user token):") || "").trim();
    saveToken(token);
  }
  return token;
}
