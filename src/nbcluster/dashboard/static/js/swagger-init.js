import { docsToken } from "./docs-token.js";

const token = docsToken();
window.SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  // Every request the page makes, the schema's included, carries the token in a header.
  requestInterceptor: (request) => {
    if (token) request.headers.Authorization = `token ${token}`;
    return request;
  },
});
