// The interactive API docs (/docs): Swagger UI, vendored in ./vendor and served by Parley
// under the same Content-Security-Policy as the page: nothing is loaded from elsewhere.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  // Swagger UI would otherwise show a badge loaded from validator.swagger.io.
  validatorUrl: null,
});
